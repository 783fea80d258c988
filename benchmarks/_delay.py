"""A TCP proxy that delays every byte by a fixed time in each direction, in a thread of its own:
a long link (50 ms each way = a 100 ms round trip) in front of a loopback sshd, without netem.

Each chunk read from one side is written to the other ``delay`` seconds after it arrived, in
order, so bandwidth is untouched and only latency is added. The proxy also counts the
*exchanges* on each connection: a client-to-box burst that follows box-to-client bytes is a
new request after an answer, i.e. one more round trip the user waits for. Plain ``ssh`` over a
warm master is counted the same way, so the two figures compare.
"""

from __future__ import annotations

import asyncio
import threading
import time


class DelayProxy:
    def __init__(self, target_port: int, delay: float, host: str = "127.0.0.1") -> None:
        self.target = (host, target_port)
        self.delay = delay
        self.exchanges = 0
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, daemon=True)
        self._thread.start()
        self._ready.wait(10)

    def _main(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._client, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()

    async def _client(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        try:
            br, bw = await asyncio.open_connection(*self.target)
        except OSError:
            cw.close()
            return
        last = ["none"]  # which way the last bytes went, for counting exchanges
        try:
            await asyncio.gather(self._pump(cr, bw, last, "up"), self._pump(br, cw, last, "down"))
        except asyncio.CancelledError:
            pass
        for w in (cw, bw):
            w.close()

    async def _pump(
        self, r: asyncio.StreamReader, w: asyncio.StreamWriter, last: list[str], way: str
    ) -> None:
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def writer() -> None:
            while True:
                due, data = await queue.get()
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                if not data:
                    break
                w.write(data)
                await w.drain()
            if w.can_write_eof():
                w.write_eof()

        task = asyncio.ensure_future(writer())
        try:
            while True:
                data = await r.read(1 << 16)
                if way == "up" and data and last[0] != "up":
                    self.exchanges += 1
                if data:
                    last[0] = way
                queue.put_nowait((time.monotonic() + self.delay, data))
                if not data:
                    break
            await task
        except (ConnectionError, OSError):
            task.cancel()
            w.close()

    async def _shutdown(self) -> None:
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
