"""A stand-in for AWS IoT Core refusing a publish: a TCP proxy in front of an MQTT broker that
closes the client's connection when the client publishes to a topic starting with a denied
prefix, as AWS IoT Core does for a publish the policy denies (MQTT 3.1.1 has no other way to
refuse one; Mosquitto acknowledges a denied publish instead). Everything else passes unchanged.

Usage: refusing_proxy.py <upstream-port> <denied-topic-prefix>
Prints the port it listens on (127.0.0.1, free port).
"""

import asyncio
import sys

UPSTREAM = int(sys.argv[1])
DENIED = sys.argv[2].encode()


async def read_packet(reader):
    """One MQTT packet: (first byte, whole packet bytes)."""
    first = await reader.readexactly(1)
    length, multiplier, raw = 0, 1, b""
    while True:
        b = await reader.readexactly(1)
        raw += b
        length += (b[0] & 0x7F) * multiplier
        if b[0] & 0x80 == 0:
            break
        multiplier *= 128
    body = await reader.readexactly(length)
    return first[0], first + raw + body, body


async def client_to_broker(reader, writer):
    try:
        while True:
            first, packet, body = await read_packet(reader)
            if first >> 4 == 3:  # PUBLISH
                topic_len = int.from_bytes(body[:2], "big")
                if body[2 : 2 + topic_len].startswith(DENIED):
                    print("refused", body[2 : 2 + topic_len].decode(), file=sys.stderr, flush=True)
                    # What came before is answered (the broker's acknowledgements pass), then
                    # the connection closes.
                    await asyncio.sleep(0.2)
                    break
            writer.write(packet)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
        pass


async def broker_to_client(reader, writer):
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
        asyncio.ensure_future(client_to_broker(reader, up_writer)),
        asyncio.ensure_future(broker_to_client(up_reader, writer)),
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
