"""A group of Ray actors that survives the death of its members: when a call fails because its actor
died (killed, out of memory, node lost), the actor is replaced by a fresh one built with the same
arguments and the call runs again on it, up to `max_retries` times per call.

Calls must be safe to repeat: the generator's and the scorer's are (every batch carries its own
seed), so a retried batch returns exactly what the lost one would have.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

log = logging.getLogger("sweetspot.actors")


@dataclass
class Call:
    """One submitted method call: what to resubmit if its actor dies."""

    method: str
    args: tuple
    kwargs: dict
    slot: int
    actor: object  # the handle it ran on (to tell whether that actor was already replaced)
    ref: object  # ray.ObjectRef of the result
    attempts: int = 1
    tags: dict = field(default_factory=dict)  # caller's bookkeeping (e.g. the batch index)


class ResilientActors:
    """`size` actors of class `cls`, created with `ray.remote(**options)(cls).remote(*args, **kwargs)`.

    `call` submits to the member with the fewest calls in flight; `get` returns a call's result,
    replacing a dead member and resubmitting as needed (`ray.wait` on `Call.ref` tells what is ready).
    """

    def __init__(self, cls, size: int, args: tuple = (), kwargs: dict | None = None, options: dict | None = None,
                 max_retries: int = 3, name: str | None = None):
        import ray

        self._remote = ray.remote(**(options or {}))(cls)
        self._args, self._kwargs = args, kwargs or {}
        self.max_retries, self.name = max_retries, name or cls.__name__
        self.actors = [self._remote.remote(*args, **self._kwargs) for _ in range(size)]
        self._in_flight = [0] * size
        self.replacements = 0

    def call(self, method: str, *args, tags: dict | None = None, **kwargs) -> Call:
        slot = min(range(len(self.actors)), key=lambda i: (self._in_flight[i], i))
        return self._submit(Call(method, args, kwargs, slot, None, None, tags=tags or {}))

    def _submit(self, c: Call) -> Call:
        c.actor = self.actors[c.slot]
        c.ref = getattr(c.actor, c.method).remote(*c.args, **c.kwargs)
        self._in_flight[c.slot] += 1
        return c

    def _replace(self, c: Call, error: Exception) -> None:
        import ray

        if self.actors[c.slot] is c.actor:  # first failure seen from this actor: replace it once
            log.warning("%s actor %d died (%s); starting a replacement", self.name, c.slot, type(error).__name__)
            try:
                ray.kill(c.actor)
            except Exception:  # already gone
                pass
            self.actors[c.slot] = self._remote.remote(*self._args, **self._kwargs)
            self.replacements += 1
        if c.attempts > self.max_retries:
            raise RuntimeError(f"{self.name}.{c.method} failed {c.attempts} times: its actor kept dying") from error
        c.attempts += 1
        self._submit(c)

    def get(self, c: Call):
        """The result of `c`, resubmitting it on a replacement actor if its actor died."""
        import ray
        from ray.exceptions import RayActorError

        while True:
            try:
                value = ray.get(c.ref)
            except RayActorError as e:
                self._in_flight[c.slot] -= 1
                self._replace(c, e)
                continue
            self._in_flight[c.slot] -= 1
            return value

    def shutdown(self) -> None:
        import ray

        for a in self.actors:
            try:
                ray.kill(a)
            except Exception:
                pass
        self.actors = []


