"""A TCP proxy that passes at most <bytes-per-second> from the client to the broker (a sink
slower than the source), and everything the other way at full speed.

Usage: slow_proxy.py <upstream-port> <bytes-per-second>
Prints the port it listens on (127.0.0.1, free port).
"""

import asyncio
import sys
import time

UPSTREAM = int(sys.argv[1])
RATE = int(sys.argv[2])


async def throttled(reader, writer):
    start, sent = time.monotonic(), 0
    try:
        while True:
            data = await reader.read(4096)
            if not data:
                break
            writer.write(data)
            await writer.drain()
            sent += len(data)
            ahead = sent / RATE - (time.monotonic() - start)
            if ahead > 0:
                await asyncio.sleep(ahead)
    except (ConnectionError, asyncio.CancelledError):
        pass


async def plain(reader, writer):
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.CancelledError):
        pass


async def handle(reader, writer):
    up_reader, up_writer = await asyncio.open_connection("127.0.0.1", UPSTREAM)
    tasks = [
        asyncio.ensure_future(throttled(reader, up_writer)),
        asyncio.ensure_future(plain(up_reader, writer)),
    ]
    await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for t in tasks:
        t.cancel()
    for w in (writer, up_writer):
        try:
            w.close()
        except Exception:
            pass


async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    async with server:
        await server.serve_forever()


asyncio.run(main())
