"""An HTTPS endpoint that answers like a Kubernetes API server refusing the caller.

Usage: https_stub.py <cert.pem> <key.pem> <code>

Prints the port it listens on (127.0.0.1, free port). GET /version answers 200 with a version
document; every other request answers <code> (401, 403 or 404) with a Kubernetes Status body,
as an API server does for a caller without the right credentials or RBAC, or for a resource
whose CRD is missing.
"""

import http.server
import json
import ssl
import sys

CERT, KEY, CODE = sys.argv[1], sys.argv[2], int(sys.argv[3])
REASONS = {401: "Unauthorized", 403: "Forbidden", 404: "NotFound"}


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path.startswith("/version"):
            body = {"major": "1", "minor": "28", "gitVersion": "v1.28.7", "gitCommit": "stub",
                    "gitTreeState": "clean", "buildDate": "2024-01-01T00:00:00Z",
                    "goVersion": "go1.21", "compiler": "gc", "platform": "linux/amd64"}
            self.reply(200, body)
            return
        message = {
            401: "Unauthorized",
            403: f'iotpolicybindings.iot.operator.dev is forbidden: User "system:serviceaccount:iot-operator:iot-operator" cannot list resource "iotpolicybindings" in API group "iot.operator.dev" at the cluster scope',
            404: "the server could not find the requested resource",
        }[CODE]
        self.reply(CODE, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                          "message": message, "reason": REASONS[CODE], "code": CODE})

    def reply(self, code, body):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(CERT, KEY)
server.socket = context.wrap_socket(server.socket, server_side=True)
print(server.server_address[1], flush=True)
server.serve_forever()
