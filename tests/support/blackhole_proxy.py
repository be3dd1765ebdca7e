"""A TCP proxy in front of the kube-apiserver that can cut one replica off without a reset.

Usage: blackhole_proxy.py <upstream-port>
Prints the port it listens on (127.0.0.1, free port). SIGUSR1 starts a partition: from then on
nothing is read, written or connected in either direction, and no connection is closed, as when
a network drops a host's packets (the peers see silence, not an error). SIGUSR2 ends it: what
was held back flows again, as TCP retransmission delivers it once a partition heals. TLS passes
through untouched.
"""

import asyncio
import signal
import sys

UPSTREAM = int(sys.argv[1])
OPEN = asyncio.Event()


async def pump(reader, writer):
    try:
        while True:
            await OPEN.wait()
            data = await reader.read(65536)
            if not data:
                break
            await OPEN.wait()
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.CancelledError):
        pass


async def handle(reader, writer):
    await OPEN.wait()
    try:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", UPSTREAM)
    except OSError:
        writer.close()
        return
    tasks = [
        asyncio.ensure_future(pump(reader, up_writer)),
        asyncio.ensure_future(pump(up_reader, writer)),
    ]
    await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    # A closed side closes the other, but never while partitioned.
    await OPEN.wait()
    for t in tasks:
        t.cancel()
    for w in (writer, up_writer):
        try:
            w.close()
        except Exception:
            pass


async def main():
    OPEN.set()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGUSR1, OPEN.clear)
    loop.add_signal_handler(signal.SIGUSR2, OPEN.set)
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    async with server:
        await server.serve_forever()


asyncio.run(main())
