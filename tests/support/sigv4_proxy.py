"""A stand-in for AWS IoT Core's SigV4 check in front of a Mosquitto websockets listener.

Usage: sigv4_proxy.py <upstream-port> <credentials.json> <log.jsonl>

Prints the port it listens on (127.0.0.1, free port), then for every connection reads the
WebSocket upgrade request, verifies the presigned query string with botocore's SigV4QueryAuth
(an independent implementation), and either answers 403 or forwards the request unchanged to
the upstream and pipes bytes both ways. The accepted credentials are read from the JSON file on
every connection ({"AKID": {"secret": "...", "token": "..." or null}}), so a test can rotate
them. Each decision is appended to the log file as one JSON line.
"""

import asyncio
import datetime
import json
import sys
import urllib.parse
from unittest import mock

import botocore.auth
from botocore.auth import SigV4QueryAuth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

UPSTREAM = int(sys.argv[1])
CREDS_FILE = sys.argv[2]
LOG_FILE = sys.argv[3]


def log(entry):
    with open(LOG_FILE, "a") as f:
        f.write(json.dumps(entry) + "\n")


def verify(target, host):
    """Returns (ok, reason, access key id)."""
    split = urllib.parse.urlsplit(target)
    if split.path != "/mqtt":
        return False, "path", None
    pairs = urllib.parse.parse_qsl(split.query, keep_blank_values=True)
    if not pairs:
        return False, "unsigned", None
    params = dict(pairs)
    token = None
    if "X-Amz-Security-Token" in params:
        if pairs[-1][0] != "X-Amz-Security-Token":
            return False, "token-not-last", None
        token = pairs[-1][1]
        pairs = pairs[:-1]
    try:
        akid, date, region, service, _ = params["X-Amz-Credential"].split("/")
        when = datetime.datetime.strptime(params["X-Amz-Date"], "%Y%m%dT%H%M%SZ")
        expires = int(params["X-Amz-Expires"])
        signature = params["X-Amz-Signature"]
    except (KeyError, ValueError):
        return False, "malformed", None
    if service != "iotdevicegateway":
        return False, "service", akid
    now = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)
    if when + datetime.timedelta(seconds=expires) < now:
        return False, "expired", akid
    with open(CREDS_FILE) as f:
        creds = json.load(f)
    if akid not in creds:
        return False, "unknown-key", akid
    if creds[akid].get("token") != token:
        return False, "token", akid
    req = AWSRequest(method="GET", url=f"wss://{host}/mqtt")
    with mock.patch.object(botocore.auth, "get_current_datetime", return_value=when):
        SigV4QueryAuth(Credentials(akid, creds[akid]["secret"]), service, region, expires=expires).add_auth(req)
    expected = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(req.url).query))["X-Amz-Signature"]
    if expected != signature:
        return False, "signature", akid
    return True, "ok", akid


async def pipe(reader, writer):
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        try:
            writer.close()
        except Exception:
            pass


async def handle(reader, writer):
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        writer.close()
        return
    lines = head.decode("latin-1").split("\r\n")
    method, target, _ = lines[0].split(" ", 2)
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    ok, reason, akid = verify(target, headers.get("host", ""))
    log({"ok": ok, "reason": reason, "akid": akid})
    if not ok:
        writer.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        await writer.drain()
        writer.close()
        return
    up_reader, up_writer = await asyncio.open_connection("127.0.0.1", UPSTREAM)
    up_writer.write(head)
    await up_writer.drain()
    await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", 0, limit=1 << 16)
    print(server.sockets[0].getsockname()[1], flush=True)
    async with server:
        await server.serve_forever()


asyncio.run(main())
