"""An asyncio event loop on a thread of its own, for the receivers' front ends.

Connections and calls wait on the loop (a slow client costs a coroutine, not a thread); decoding and
handing requests to the pipelines run on a small pool of worker threads.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from concurrent import futures
from typing import Any, Optional


class LoopThread:
    def __init__(self, name: str, workers: int = 8) -> None:
        self.name = name
        self.loop = asyncio.new_event_loop()
        self.pool = futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"{name}-work")
        self._thread: Optional[threading.Thread] = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def call(self, coro: Coroutine, timeout: float = 30.0) -> Any:
        """Run ``coro`` on the loop and wait for its result (from another thread)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def work(self, fn, *args) -> Any:
        """Run blocking ``fn(*args)`` on the worker pool (from the loop)."""
        return await self.loop.run_in_executor(self.pool, fn, *args)

    def stop(self) -> None:
        if self._thread is None:
            return

        async def _cancel_rest() -> None:
            me = asyncio.current_task()
            rest = [t for t in asyncio.all_tasks() if t is not me]
            for t in rest:
                t.cancel()
            await asyncio.gather(*rest, return_exceptions=True)

        try:
            self.call(_cancel_rest(), timeout=5.0)
        except Exception:  # noqa: BLE001 - stopping anyway
            pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5.0)
        self._thread = None
        self.pool.shutdown(wait=False, cancel_futures=True)
        if not self.loop.is_running():
            self.loop.close()
