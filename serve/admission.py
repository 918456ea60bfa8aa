"""Admission control for the Serve ingress: bounded waits, and a fast 503 for the excess.

An Api replica admits a sampling request only when the time the request is expected to spend in
the replica stays within `max_wait_s`; otherwise it refuses it at once, with the expected wait (the
app answers 503 with Retry-After). Without it, an overloaded server accepts everything its queues
hold and every accepted request waits behind them (600 simultaneous requests on the default task:
p50 34.5 s, p99 81 s), while the requests past the queues got their 503 only seconds later.

The estimate is Little's law, L = mu W: with L requests in flight in this replica and completions at
rate mu, a request admitted now leaves after about (L + 1) / mu. It is admitted when that is at most
max_wait_s. mu is measured, not configured: the successful completions per second of *busy* time
(time with at least one request in flight) over the last `window_s` busy seconds. Busy time, not
wall time: at light load the completions per wall second are the arrival rate, not what the server
can do, and would refuse an idle server's next request (one request every 20 s would read as
0.05/s). Per busy second, a server answering one request at a time in S seconds reads 1/S (its next
request expected to take S), and one that is saturated reads its throughput. Idle periods stop the
clock, so the estimate survives them. Requests that fail (a 4xx or 5xx, a client that went away)
leave without counting as completions: their short stay would inflate mu.

And never more than `max_in_flight` requests at once, whatever the estimate: past what the
generator replicas take (their max_ongoing_requests), requests wait in Ray Serve's handle queue,
which hands them on slowly (its router retries a full replica with backoff), so the batches shrink
and the throughput falls. Measured on the default task, 200 clients on 2 cores: at most 48 in
flight (the generator's 32 and a batch) answered 44.7 requests/s, 64 answered 16.1/s, 96 12.9/s,
and admission off 10.0/s (docs/benchmarks.md). The handle's own max_queued_requests stays behind
as the backstop; its refusals cost more than these (a logged warning and a failed handle call each).

Before `min_completions` completions are in the window there is no estimate (a fresh replica, or
one whose completions aged out): then at most `min_in_flight` requests are in flight at once, a
few batches' worth. Afterwards an idle replica (nothing in flight) always admits: were its estimate
too pessimistic (a slow request measured once), refusing everything would leave no completion to
correct it.

What the estimate does not see: requests differ in cost (n, max_tokens), and mu is an average over
the recent mix; a batched server (serve.batching) finishes a request up to one batch's service
time after its Little's-law estimate at worst (it starts whole batches, not single requests). Both
are small beside a bound of seconds; tests/test_admission.py measures them on a simulated server.

Every admitted request must leave: use `with admission.admit(): ...`, which counts it out whatever
happens inside (an exception, a cancelled task when the client disconnects), exactly once.

Pure Python, no Ray: one instance per Api replica, used from its event loop (no locking: the
decision and the count change happen with no await between them).
"""
from __future__ import annotations

import collections
import math
import time
from typing import Callable


class Refused(Exception):
    """A request the replica does not admit: the message names why; expected_wait_s is the
    estimate (None while no completion rate is measured yet)."""

    def __init__(self, message: str, expected_wait_s: float | None):
        super().__init__(message)
        self.expected_wait_s = expected_wait_s


class Admission:
    """Admits a request while its expected wait, (in flight + 1) / completion rate, is at most
    max_wait_s (the module docstring). `clock` is monotonic seconds (a fake one in tests)."""

    def __init__(self, max_wait_s: float = 10.0, max_in_flight: int = 48, min_in_flight: int = 32, min_completions: int = 16,
                 window_s: float = 30.0, clock: Callable[[], float] = time.monotonic):
        for name, value, ok in (("max_wait_s", max_wait_s, max_wait_s > 0), ("window_s", window_s, window_s > 0),
                                ("max_in_flight", max_in_flight, max_in_flight >= 1),
                                ("min_in_flight", min_in_flight, min_in_flight >= 1),
                                ("min_completions", min_completions, min_completions >= 1)):
            if not (ok and math.isfinite(value)):
                raise ValueError(f"admission.{name}: expected a finite number {'> 0' if name.endswith('_s') else '>= 1'}, got {value!r}")
        if min_in_flight > max_in_flight:
            raise ValueError(f"admission.min_in_flight: expected at most admission.max_in_flight ({max_in_flight}), got {min_in_flight}")
        self.max_wait_s, self.max_in_flight, self.min_in_flight = max_wait_s, max_in_flight, min_in_flight
        self.min_completions, self.window_s = min_completions, window_s
        self.clock = clock
        self.in_flight = 0
        self._busy = 0.0  # busy seconds (in_flight > 0) up to self._since
        self._since = clock()
        self._stamps: collections.deque[float] = collections.deque()  # the busy clock at each recent completion
        self.counts = collections.Counter()  # admitted, refused, completed, failed

    def busy_time(self) -> float:
        """Seconds spent with at least one request in flight since the start, up to now."""
        now = self.clock()
        if self.in_flight > 0:
            self._busy += max(0.0, now - self._since)
        self._since = now
        return self._busy

    def rate(self) -> float | None:
        """Completions per busy second over the last window_s busy seconds, or None while fewer than
        min_completions completions are in that window."""
        busy = self.busy_time()
        while self._stamps and self._stamps[0] <= busy - self.window_s:
            self._stamps.popleft()
        span = min(self.window_s, busy)
        if len(self._stamps) < self.min_completions or span <= 0:
            return None
        return len(self._stamps) / span

    def expected_wait(self) -> float | None:
        """Seconds a request admitted now is expected to stay: (in flight + 1) / rate; None without a rate."""
        rate = self.rate()
        return None if rate is None else (self.in_flight + 1) / rate

    def enter(self) -> None:
        """Count a request in, or raise Refused (nothing counted). Prefer `admit()`, which also counts it out."""
        rate = self.rate()  # brings the busy clock up to now before in_flight changes
        if self.in_flight >= self.max_in_flight:
            self.counts["refused"] += 1
            wait = None if rate is None else (self.in_flight + 1) / rate
            raise Refused(f"overloaded: {self.in_flight} requests in flight = admission.max_in_flight "
                          f"{self.max_in_flight}" + ("" if wait is None else f" (expected wait {wait:.3g} s)"), wait)
        if rate is None:
            if self.in_flight >= self.min_in_flight:
                self.counts["refused"] += 1
                raise Refused(f"overloaded: {self.in_flight} requests in flight = admission.min_in_flight "
                              f"{self.min_in_flight}, and no completion rate measured yet ({len(self._stamps)} of "
                              f"admission.min_completions {self.min_completions} recent completions)", None)
        else:
            wait = (self.in_flight + 1) / rate
            if self.in_flight > 0 and wait > self.max_wait_s:
                self.counts["refused"] += 1
                raise Refused(f"overloaded: expected wait {wait:.3g} s > admission.max_wait_s {self.max_wait_s:g} s "
                              f"({self.in_flight} requests in flight, {rate:.3g} completed per second)", wait)
        self.in_flight += 1
        self.counts["admitted"] += 1

    def leave(self, completed: bool) -> None:
        """Count a request out; a completed one (answered) enters the rate's window."""
        if self.in_flight <= 0:
            raise RuntimeError("Admission.leave without a request in flight")
        busy = self.busy_time()
        self.in_flight -= 1
        if completed:
            self._stamps.append(busy)
            self.counts["completed"] += 1
        else:
            self.counts["failed"] += 1

    def admit(self) -> "Ticket":
        """`with admission.admit(): ...`: Refused at once, or the request counted in until the block
        ends; it counts as completed only when the block ends without an exception."""
        self.enter()
        return Ticket(self)

    def state(self) -> dict:
        """What /v1/stats shows: the bound and knobs, requests in flight, the measured rate and the
        expected wait of the next request (None while unmeasured), and the counts so far."""
        rate = self.rate()
        return {"enabled": True, "max_wait_s": self.max_wait_s, "max_in_flight": self.max_in_flight,
                "min_in_flight": self.min_in_flight,
                "min_completions": self.min_completions, "window_s": self.window_s, "in_flight": self.in_flight,
                "completion_rate_per_s": rate, "expected_wait_s": None if rate is None else (self.in_flight + 1) / rate,
                "window_completions": len(self._stamps), "busy_s": self._busy,
                **{k: self.counts[k] for k in ("admitted", "refused", "completed", "failed")}}


class Ticket:
    """An admitted request; leaves its Admission exactly once, when its `with` block ends."""

    def __init__(self, admission: Admission):
        self.admission, self.left = admission, False

    def __enter__(self) -> "Ticket":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if not self.left:
            self.left = True
            self.admission.leave(completed=exc_type is None)
        return False
