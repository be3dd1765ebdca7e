"""moto, plus the one Cognito call it lacks: GetIdentityPoolRoles.

Usage: cognito_roles_stub.py <moto-url> <roles.json>

Prints the port it listens on (127.0.0.1, free port). Every request goes to moto unchanged,
except the Cognito Identity `GetIdentityPoolRoles` call, which is answered from the JSON file
(read on every call): {"<pool id>": {"authenticated": "<role arn>", "unauthenticated": "..."}}.
A pool not in the file answers ResourceNotFoundException, as AWS does.
"""

import http.server
import json
import sys
import urllib.error
import urllib.request

MOTO = sys.argv[1].rstrip("/")
ROLES = sys.argv[2]


class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def reply(self, code, body, content_type):
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def handle_any(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.headers.get("X-Amz-Target") == "AWSCognitoIdentityService.GetIdentityPoolRoles":
            pool = json.loads(body or b"{}").get("IdentityPoolId")
            with open(ROLES) as f:
                roles = json.load(f).get(pool)
            if roles is None:
                err = {"__type": "ResourceNotFoundException", "message": f"{pool} not found"}
                return self.reply(400, json.dumps(err).encode(), "application/x-amz-json-1.1")
            answer = {"IdentityPoolId": pool, "Roles": roles}
            return self.reply(200, json.dumps(answer).encode(), "application/x-amz-json-1.1")
        req = urllib.request.Request(MOTO + self.path, data=body or None, method=self.command)
        for k, v in self.headers.items():
            if k.lower() not in ("host", "content-length", "connection"):
                req.add_header(k, v)
        try:
            with urllib.request.urlopen(req) as r:
                self.reply(r.status, r.read(), r.headers.get("Content-Type", "text/plain"))
        except urllib.error.HTTPError as e:
            self.reply(e.code, e.read(), e.headers.get("Content-Type", "text/plain"))

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = handle_any


server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
print(server.server_address[1], flush=True)
server.serve_forever()
