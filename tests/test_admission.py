"""serve.admission without Ray, on a fake clock: the exact admit/refuse decisions for constructed
arrivals and completions, no request left counted in after an exception or a cancellation, and a
simulated server (deterministic service at rate mu, arrivals at 10 mu) whose admitted requests all
finish within the bound while the excess is refused."""
import asyncio
import collections
import contextlib

import pytest

from serve.admission import Admission, Refused


class Clock:
    def __init__(self, t: float = 0.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def served(a: Admission, clock: Clock, start: float, end: float) -> None:
    """One request in flight alone from start to end, completed."""
    clock.t = start
    a.enter()
    clock.t = end
    a.leave(completed=True)


def test_before_a_rate_is_measured_at_most_min_in_flight_are_admitted():
    clock = Clock()
    a = Admission(max_wait_s=5, min_in_flight=2, min_completions=3, window_s=100, clock=clock)
    a.enter()
    a.enter()
    with pytest.raises(Refused) as refused:
        a.enter()
    assert refused.value.expected_wait_s is None
    assert str(refused.value) == ("overloaded: 2 requests in flight = admission.min_in_flight 2, and no completion rate "
                                  "measured yet (0 of admission.min_completions 3 recent completions)")
    assert a.in_flight == 2 and a.counts == {"admitted": 2, "refused": 1}
    clock.t = 1
    a.leave(completed=True)  # one completion of the three needed: still the count cap
    a.enter()
    with pytest.raises(Refused):
        a.enter()
    assert a.rate() is None and a.expected_wait() is None and a.in_flight == 2


def test_littles_law_admits_while_the_expected_wait_is_within_the_bound():
    """Two requests served one after the other in 1 s each: 1 completion per busy second. The next
    request is expected to wait (in flight + 1) / 1 s: 1, 2, 3 s are admitted under a 3 s bound,
    4 s is refused with its estimate; time passing idle changes nothing."""
    clock = Clock()
    a = Admission(max_wait_s=3, min_in_flight=1, min_completions=2, window_s=100, clock=clock)
    served(a, clock, 0, 1)
    served(a, clock, 1, 2)
    clock.t = 50  # idle for 48 s: not busy time, the rate is still 1/s
    assert a.rate() == 1.0 and a.expected_wait() == 1.0 and a.busy_time() == 2.0
    a.enter()
    a.enter()
    a.enter()
    with pytest.raises(Refused) as refused:
        a.enter()
    assert refused.value.expected_wait_s == 4.0
    assert str(refused.value) == ("overloaded: expected wait 4 s > admission.max_wait_s 3 s "
                                  "(3 requests in flight, 1 completed per second)")
    assert a.in_flight == 3 and a.counts["refused"] == 1
    # 2 busy seconds with no completion: 2 completions in 4 busy seconds, 0.5/s
    clock.t = 52
    assert a.rate() == 0.5 and a.expected_wait() == 8.0
    for _ in range(3):  # all three complete at 52: 5 completions in 4 busy seconds
        a.leave(completed=True)
    assert a.rate() == 1.25 and a.expected_wait() == 0.8
    a.enter()
    a.enter()
    a.enter()  # 3 / 1.25 = 2.4 s
    with pytest.raises(Refused) as refused:
        a.enter()  # 4 / 1.25 = 3.2 s
    assert refused.value.expected_wait_s == pytest.approx(3.2)


def test_never_more_than_max_in_flight_whatever_the_estimate():
    """10 completions per busy second and a 10 s bound would admit 100; max_in_flight 3 holds."""
    clock = Clock()
    a = Admission(max_wait_s=10, max_in_flight=3, min_in_flight=1, min_completions=1, window_s=100, clock=clock)
    served(a, clock, 0, 0.1)
    for _ in range(3):
        a.enter()
    with pytest.raises(Refused) as refused:
        a.enter()
    assert refused.value.expected_wait_s == pytest.approx(0.4)
    assert str(refused.value) == "overloaded: 3 requests in flight = admission.max_in_flight 3 (expected wait 0.4 s)"
    a.leave(completed=True)
    a.enter()
    assert a.in_flight == 3 and a.counts["refused"] == 1


def test_the_rate_is_measured_over_the_last_window_s_busy_seconds():
    clock = Clock()
    a = Admission(max_wait_s=10, min_in_flight=1, min_completions=2, window_s=4, clock=clock)
    for i in range(4):  # 1 s each: completions at busy 1, 2, 3, 4
        served(a, clock, 10 * i, 10 * i + 1)
    assert a.rate() == 1.0  # (0, 4]: 4 completions in 4 s
    for i in range(4, 8):  # now 0.5 s each: completions at busy 4.5, 5, 5.5, 6
        served(a, clock, 10 * i, 10 * i + 0.5)
    assert a.rate() == 6 / 4  # (2, 6]: busy 3, 4, 4.5, 5, 5.5, 6
    a.enter()
    clock.t += 4  # 4 busy seconds with no completion: (6, 10] holds none, so there is no rate again
    assert a.rate() is None and a.state()["window_completions"] == 0
    with pytest.raises(Refused) as refused:  # the count cap holds again (min_in_flight 1)
        a.enter()
    assert refused.value.expected_wait_s is None


def test_an_idle_replica_admits_even_when_one_request_is_expected_to_wait_longer():
    """A single request took 5 s, over a 1 s bound: the next one is still admitted when nothing is in
    flight (refusing would leave no completion to correct the estimate), the one beside it is not."""
    clock = Clock()
    a = Admission(max_wait_s=1, min_in_flight=1, min_completions=1, window_s=100, clock=clock)
    served(a, clock, 0, 5)
    assert a.expected_wait() == 5.0
    a.enter()
    with pytest.raises(Refused) as refused:
        a.enter()
    assert refused.value.expected_wait_s == 10.0


def test_admitted_requests_always_leave_and_failures_do_not_count_as_completions():
    clock = Clock()
    a = Admission(max_wait_s=5, min_in_flight=2, min_completions=1, window_s=100, clock=clock)
    with pytest.raises(ValueError):
        with a.admit():
            clock.t = 1
            raise ValueError("the generator failed")
    assert a.in_flight == 0 and a.counts["failed"] == 1 and a.counts["completed"] == 0
    assert a.rate() is None  # a failure is no completion: its short stay must not raise the rate

    async def client(started: asyncio.Event):
        with a.admit():
            started.set()
            await asyncio.sleep(3600)

    async def disconnect():  # Serve cancels the handler's task when its client goes away
        started = asyncio.Event()
        task = asyncio.create_task(client(started))
        await started.wait()
        assert a.in_flight == 1
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    asyncio.run(disconnect())
    assert a.in_flight == 0 and a.counts["failed"] == 2

    with a.admit() as ticket:
        clock.t = 2
    ticket.__exit__(None, None, None)  # a second exit counts nothing
    assert a.in_flight == 0 and a.counts["completed"] == 1
    with pytest.raises(RuntimeError, match="without a request in flight"):
        a.leave(completed=True)
    a.enter()
    a.enter()
    with pytest.raises(Refused):  # 3 / 0.5 = 6 s > 5 s; a refused request was never counted in
        a.admit()
    assert a.in_flight == 2 and a.counts["refused"] == 1


@pytest.mark.parametrize("field, value", [("max_wait_s", 0), ("max_wait_s", float("inf")), ("max_in_flight", 0),
                                          ("min_in_flight", 0), ("min_in_flight", 49), ("min_completions", 0),
                                          ("window_s", -1)])
def test_bad_settings_are_refused_by_name(field, value):
    with pytest.raises(ValueError, match=f"admission.{field}"):  # min_in_flight 49: over max_in_flight's 48
        Admission(**{field: value})


def simulate(mu: float, batch: int, overload: float, max_wait_s: float, seconds: float, window_s: float = 5.0) -> dict:
    """A server that serves `batch` requests at a time in batch / mu seconds (continuous batching: an
    idle server starts at once with what is waiting, the rest go together in the next batch), behind
    an Admission, with requests arriving every 1 / (overload mu) seconds. The clock counts integer
    ticks of 1/1000 of a request's service time, so every event time is exact."""
    tick = 1 / (1000 * mu)  # seconds
    service = 1000 * batch  # ticks per batch
    every = round(1000 / overload)  # ticks between arrivals
    clock = Clock(0)
    a = Admission(max_wait_s=max_wait_s / tick, min_in_flight=batch, min_completions=10, window_s=window_s / tick,
                  clock=clock)
    waiting: collections.deque = collections.deque()
    running, ends, waits, refused, done_in_time = [], None, [], 0, 0

    def start(now: int) -> int | None:
        running[:] = [waiting.popleft() for _ in range(min(batch, len(waiting)))]
        return now + service if running else None

    def advance(until: int) -> None:
        nonlocal ends, done_in_time
        while ends is not None and ends <= until:
            clock.t = ends
            for arrived in running:
                a.leave(completed=True)
                waits.append((ends - arrived) * tick)
                done_in_time += ends * tick <= seconds
            ends = start(ends)

    for now in range(0, round(seconds / tick), every):
        advance(now)
        clock.t = now
        try:
            a.enter()
        except Refused:
            refused += 1
            continue
        waiting.append(now)
        if ends is None:
            ends = start(now)
    advance(10**15)
    assert a.in_flight == 0
    # per_s: the server's throughput while requests arrive (the admitted ones still queued at the end finish later)
    return {"waits": waits, "refused": refused, "admitted": len(waits), "per_s": done_in_time / seconds}


def test_a_10x_overload_is_refused_and_the_admitted_wait_within_the_bound():
    """One request at a time at mu = 10/s, 100 arrivals/s for 60 s, a 2 s bound: every admitted
    request finishes within 2 s and the bound is used (the longest wait is close to it); the server
    stays busy (about mu admitted per second); about 90% are refused."""
    r = simulate(mu=10, batch=1, overload=10, max_wait_s=2.0, seconds=60)
    assert max(r["waits"]) <= 2.0 + 1e-9 and max(r["waits"]) >= 1.8, max(r["waits"])
    assert 9.5 <= r["per_s"] <= 10.0
    assert 0.88 <= r["refused"] / (r["refused"] + r["admitted"]) <= 0.91


def test_a_batched_server_overshoots_the_bound_by_at_most_one_batch():
    """Batches of 8 in 0.8 s (mu = 10/s), 10x overload, a 2 s bound: Little's law counts requests,
    the server starts whole batches, so a wait may pass the estimate by up to one batch's service
    time (module docstring); the server stays busy and about 90% are refused."""
    r = simulate(mu=10, batch=8, overload=10, max_wait_s=2.0, seconds=60)
    assert max(r["waits"]) <= 2.0 + 0.8 + 1e-9, max(r["waits"])
    assert r["per_s"] >= 9.0
    assert 0.88 <= r["refused"] / (r["refused"] + r["admitted"]) <= 0.92
