"""Tokens per API key over a sliding minute: what the ingress admits before a request reaches a
model replica.

    quota = TokenQuota(per_minute=20_000)
    charge = quota.admit(owner, reserve=max_tokens)   # ServeError 429 (retry_after set) when spent
    ...                                                # the generation, or a document's encoding
    charge.settle(prompt_tokens + completion_tokens)  # what it really cost replaces the reservation

A request is admitted while the key's tokens of the last minute are under its limit; it reserves
its largest possible cost until it settles, so concurrent requests of one key see each other. The
count lives in the ingress: the app runs one ingress replica, so it is the key's whole count.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque

from pipelines.serve.schemas import ServeError

WINDOW_S = 60.0


class Charge:
    """One request's entry in its key's count: reserved when admitted, settled when done."""

    def __init__(self, quota: "TokenQuota", entry: list):
        self._quota, self._entry = quota, entry

    def settle(self, tokens: int) -> None:
        with self._quota._lock:
            self._entry[1] = max(0, int(tokens))


class TokenQuota:
    def __init__(self, per_minute: int, window_s: float = WINDOW_S, clock=time.monotonic):
        if per_minute < 1:
            raise ValueError(f"a token quota must be at least 1 token a minute, got {per_minute}")
        self.per_minute, self.window_s, self.clock = per_minute, window_s, clock
        self._spent: dict[str, deque] = {}  # owner -> [[time, tokens], ...], oldest first
        self._lock = threading.Lock()

    def used(self, owner: str) -> int:
        with self._lock:
            return sum(t for _, t in self._recent(owner, self.clock()))

    def admit(self, owner: str, reserve: int = 0) -> Charge:
        """Admit one request of `owner`, reserving `reserve` tokens; 429 if the key's minute is spent."""
        with self._lock:
            now = self.clock()
            recent = self._recent(owner, now)
            used = sum(t for _, t in recent)
            if used >= self.per_minute:
                wait = self._wait(recent, used, now)
                error = ServeError(429, f"this key used {used} tokens in the last {self.window_s:g} s, its limit "
                                        f"{self.per_minute}: retry in {wait} s", "rate_limit_error")
                error.retry_after = wait
                raise error
            entry = [now, max(0, int(reserve))]
            recent.append(entry)
            return Charge(self, entry)

    def _recent(self, owner: str, now: float) -> deque:
        recent = self._spent.setdefault(owner, deque())
        while recent and recent[0][0] <= now - self.window_s:
            recent.popleft()
        return recent

    def _wait(self, recent: deque, used: int, now: float) -> int:
        """Whole seconds until enough of the key's oldest tokens leave the window."""
        for at, tokens in recent:
            used -= tokens
            if used < self.per_minute:
                return max(1, math.ceil(at + self.window_s - now))
        return max(1, math.ceil(self.window_s))
