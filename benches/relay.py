"""A TCP relay that stands for a WAN link: it adds a fixed delay to every chunk in
each direction (half the round trip each way) and caps the bandwidth of all the
connections through it together (a token bucket). Loopback only.

    python relay.py LISTEN_PORT TARGET_PORT RTT_MS MBIT_PER_S

Runs until killed. Used by benches/peers.sh for the WAN case.
"""
import asyncio
import sys
import time


class Bucket:
    """Bytes per second shared by every connection through the relay."""

    def __init__(self, rate):
        self.rate, self.tokens, self.last = rate, 0.0, time.monotonic()

    async def take(self, n):
        while True:
            now = time.monotonic()
            self.tokens = min(self.rate * 0.05, self.tokens + (now - self.last) * self.rate)
            self.last = now
            if self.tokens >= n or self.tokens >= self.rate * 0.05:
                self.tokens -= n
                return
            await asyncio.sleep(max(0.001, (n - self.tokens) / self.rate))


async def pipe(reader, writer, delay, bucket):
    queue = asyncio.Queue(maxsize=256)

    async def pump():
        while True:
            data = await reader.read(64 * 1024)
            if bucket is not None and data:
                await bucket.take(len(data))
            await queue.put((time.monotonic() + delay, data))
            if not data:
                return

    async def deliver():
        while True:
            due, data = await queue.get()
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            if not data:
                try:
                    writer.write_eof()
                except OSError:
                    pass
                return
            writer.write(data)
            await writer.drain()

    try:
        await asyncio.gather(pump(), deliver())
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


async def main():
    listen, target, rtt_ms, mbit = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
    delay = rtt_ms / 2000.0
    up = Bucket(mbit * 1e6 / 8)

    async def handle(cr, cw):
        try:
            sr, sw = await asyncio.open_connection("127.0.0.1", target)
        except OSError:
            cw.close()
            return
        await asyncio.gather(pipe(cr, sw, delay, up), pipe(sr, cw, delay, None))

    server = await asyncio.start_server(handle, "127.0.0.1", listen)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
