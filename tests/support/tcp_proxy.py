"""A TCP proxy in front of an MQTT broker that plays a broker's part no test broker plays.

Usage: tcp_proxy.py <upstream-port> [--refuse PREFIX] [--rate BYTES_PER_SECOND]
                    [--publishes-per-second N] [--hold CLIENT_ID]

--refuse: close the client's connection when it publishes to a topic starting with PREFIX,
  after letting what came before be answered, as AWS IoT Core does for a publish its policy
  denies (MQTT 3.1.1 has no other way to refuse one; Mosquitto acknowledges a denied publish).
--rate: pass at most this many bytes a second from the client to the broker (a sink slower
  than the source).
--publishes-per-second: deliver at most this many PUBLISH packets a second from the broker to
  each client connection (AWS IoT Core's quota of 100 publishes a second per connection).
--hold: after SIGUSR1, nothing passes either way on the connections whose CONNECT names this
  client id (no publish taken, no acknowledgement, no PINGRESP: a broker that stopped serving
  one client, its socket staying open) until SIGUSR2, when what was held back flows.
Everything else passes unchanged. Prints the port it listens on (127.0.0.1, free port).
"""

import argparse
import asyncio
import signal
import socket
import time

parser = argparse.ArgumentParser()
parser.add_argument("upstream", type=int)
parser.add_argument("--refuse", default=None)
parser.add_argument("--rate", type=int, default=0)
parser.add_argument("--publishes-per-second", type=int, default=0)
parser.add_argument("--hold", default=None)
ARGS = parser.parse_args()
DENIED = ARGS.refuse.encode() if ARGS.refuse else None
HELD = ARGS.hold.encode() if ARGS.hold else None
# Set while the broker's bytes flow to the held client id.
FLOWING = None


async def read_packet(reader):
    """One MQTT packet: (first byte, whole packet, body)."""
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


async def held_pump(reader, writer):
    """Passes bytes while FLOWING is set; while it is not, nothing is read or written."""
    try:
        while True:
            await FLOWING.wait()
            data = await reader.read(65536)
            if not data:
                break
            await FLOWING.wait()
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.CancelledError):
        pass


async def client_to_broker(reader, writer):
    start, sent = time.monotonic(), 0
    try:
        while True:
            first, packet, body = await read_packet(reader)
            if DENIED is not None and first >> 4 == 3:  # PUBLISH
                topic = body[2 : 2 + int.from_bytes(body[:2], "big")]
                if topic.startswith(DENIED):
                    # What came before is answered (acknowledgements pass), then it closes.
                    await asyncio.sleep(0.2)
                    break
            writer.write(packet)
            await writer.drain()
            if ARGS.rate:
                sent += len(packet)
                ahead = sent / ARGS.rate - (time.monotonic() - start)
                if ahead > 0:
                    await asyncio.sleep(ahead)
    except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
        pass


def varint(data, at):
    """An MQTT variable byte integer at `at`: (value, offset after it)."""
    value, multiplier = 0, 1
    while True:
        b = data[at]
        at += 1
        value += (b & 0x7F) * multiplier
        if b & 0x80 == 0:
            return value, at
        multiplier *= 128


def client_id(body):
    """The client id of a CONNECT packet's body (MQTT 3.1.1 or 5)."""
    at = 2 + int.from_bytes(body[:2], "big")  # protocol name
    level = body[at]
    at += 1 + 1 + 2  # level, flags, keep alive
    if level == 5:
        length, at = varint(body, at)
        at += length
    n = int.from_bytes(body[at : at + 2], "big")
    return body[at + 2 : at + 2 + n]


async def broker_to_client(reader, writer):
    per_second = ARGS.publishes_per_second
    next_at = 0.0  # no credit builds up while idle: at most one publish per 1/N s
    try:
        while True:
            if per_second:
                first, packet, _ = await read_packet(reader)
                if first >> 4 == 3:  # PUBLISH
                    now = time.monotonic()
                    if next_at > now:
                        await asyncio.sleep(next_at - now)
                    next_at = max(next_at, now) + 1.0 / per_second
                writer.write(packet)
                await writer.drain()
                continue
            data = await reader.read(65536)
            if not data:
                break
            writer.write(data)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
        pass


async def handle(reader, writer):
    if ARGS.rate:
        # A small, fixed receive buffer: otherwise the kernel's autotuned buffers absorb a
        # whole burst and the client never sees the sink fall behind.
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    up_reader, up_writer = await asyncio.open_connection("127.0.0.1", ARGS.upstream)
    held = False
    if HELD is not None:
        try:
            first, packet, body = await read_packet(reader)
        except (asyncio.IncompleteReadError, ConnectionError):
            up_writer.close()
            return
        held = first >> 4 == 1 and client_id(body) == HELD
        up_writer.write(packet)
    if held:
        pumps = (held_pump(reader, up_writer), held_pump(up_reader, writer))
    else:
        pumps = (client_to_broker(reader, up_writer), broker_to_client(up_reader, writer))
    tasks = [asyncio.ensure_future(p) for p in pumps]
    await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for t in tasks:
        t.cancel()
    for w in (writer, up_writer):
        try:
            w.close()
        except Exception:
            pass


async def main():
    global FLOWING
    FLOWING = asyncio.Event()
    FLOWING.set()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGUSR1, FLOWING.clear)
    loop.add_signal_handler(signal.SIGUSR2, FLOWING.set)
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    async with server:
        await server.serve_forever()


asyncio.run(main())
