"""The model replica's engine: one thread that runs continuous batching (longmem.batching) and,
between two decoding steps, every other use of the model (writing a document to a session).

Requests arrive from the replica's event loop through `submit` and `call` (thread-safe); each
gets a concurrent Future. Serve metrics: rows per step, rows waiting, tokens generated, step time.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future

logger = logging.getLogger("ray.serve")


def _metrics():
    """Serve's metrics, or None outside a Ray worker (tests that build the class directly)."""
    try:
        from ray.serve import metrics

        return {
            "batch": metrics.Gauge("longmem_batch_rows", description="rows decoded in the last step"),
            "waiting": metrics.Gauge("longmem_waiting_rows", description="requests waiting for a row"),
            "tokens": metrics.Counter("longmem_generated_tokens", description="tokens generated"),
            "step": metrics.Histogram("longmem_step_seconds", description="time of one decoding step",
                                      boundaries=[0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5]),
        }
    except Exception:  # noqa: BLE001 - metrics are optional; serving is not
        return None


class Engine:
    def __init__(self, model, max_rows: int = 32):
        from longmem.batching import BatchDecoder

        self.decoder = BatchDecoder(model, max_rows=max_rows)
        self._lock = threading.Condition()
        self._submitted: deque = deque()  # (args, future) not yet handed to the decoder
        self._calls: deque = deque()  # (fn, future) to run between steps
        self._metrics = _metrics()
        self.tokens = self._counted = 0
        self.finished = {"length": 0, "stop": 0, "eos": 0, "cancelled": 0, "error": 0}
        self._thread = threading.Thread(target=self._loop, name="longmem-engine", daemon=True)
        self._thread.start()

    def submit(self, ids, memory, sampling, on_token=None, should_stop=None) -> Future:
        """Queue one generation; the future's result is its RowResult."""
        future: Future = Future()
        with self._lock:
            self._submitted.append(((ids, memory, sampling, on_token, should_stop), future))
            self._lock.notify()
        return future

    def call(self, fn) -> Future:
        """Run fn() in the engine thread between two steps; the future holds its result or error."""
        future: Future = Future()
        with self._lock:
            self._calls.append((fn, future))
            self._lock.notify()
        return future

    def stats(self) -> dict:
        d = self.decoder
        return {"steps": d.steps, "last_batch": d.last_batch, "max_batch": d.max_batch, "rows": len(d.rows),
                "waiting": len(d.waiting) + len(self._submitted), "max_rows": d.max_rows, "tokens": self.tokens,
                "finished": dict(self.finished)}

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not (self._submitted or self._calls or self.decoder.busy):
                    self._lock.wait()
                calls, self._calls = list(self._calls), deque()
                submitted, self._submitted = list(self._submitted), deque()
            for fn, future in calls:
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn())
                    except BaseException as e:  # noqa: BLE001 - handed to the caller
                        future.set_exception(e)
            for (ids, memory, sampling, on_token, should_stop), future in submitted:
                try:
                    row = self.decoder.submit(ids, memory, sampling, self._counting(on_token), should_stop)
                    row.future = future
                except Exception as e:  # noqa: BLE001 - a bad request fails alone
                    future.set_exception(e)
            if not self.decoder.busy:
                continue
            start = time.perf_counter()
            try:
                finished = self.decoder.step()
            except Exception:  # noqa: BLE001 - the decoder fails rows itself; this is a bug guard
                logger.exception("decoding step failed")
                finished = self._fail_all()
            self._observe(time.perf_counter() - start)
            for row in finished:
                self.finished[row.result.finish_reason] = self.finished.get(row.result.finish_reason, 0) + 1
                row.future.set_result(row.result)

    def _counting(self, on_token):
        def counted(token_id):
            self.tokens += 1
            if on_token is not None:
                on_token(token_id)

        return counted

    def _observe(self, seconds: float) -> None:
        if self._metrics:  # once a step, not once a token: metrics stay off the per-token path
            if self.tokens > self._counted:  # a Counter takes only positive increments
                self._metrics["tokens"].inc(self.tokens - self._counted)
                self._counted = self.tokens
            self._metrics["step"].observe(seconds)
            self._metrics["batch"].set(self.decoder.last_batch)
            self._metrics["waiting"].set(len(self.decoder.waiting))

    def _fail_all(self) -> list:
        from longmem.batching import BatchDecoder

        rows = list(self.decoder.rows) + list(self.decoder.waiting)
        model, max_rows = self.decoder.model, self.decoder.max_rows
        self.decoder = BatchDecoder(model, max_rows=max_rows)
        return [self.decoder._finish(row, "error", RuntimeError("the decoding step failed")) for row in rows]
