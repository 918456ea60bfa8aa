"""Fault injection for the training tests, installed through the loop shell's step hook
(train.step_hook.target: "tests.plugins.faults:fail_once"); the production loop carries none of it."""
from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

log = logging.getLogger("sweetspot.tests.faults")


def fail_once(step: int, rank: int, world: int, output_dir: str, context: dict, at_step: int, fail_rank: int = -1,
              mode: str = "raise") -> None:
    """Once per run, during (1-based) step `at_step`, rank `fail_rank` (-1: the last) raises an
    exception (mode raise), kills its own process with SIGKILL (sigkill: no exception, no cleanup, as
    when a node dies), or kills the generator actor it samples from (kill_generator, vBoN: Ray
    restarts the actor, with the weights it was built with). A marker file in the output directory
    keeps the restarted run from failing again."""
    if not -world <= fail_rank < world:
        raise ValueError(f"fail_rank: expected a rank in [-{world}, {world - 1}], got {fail_rank}")
    marker = Path(output_dir) / ".failed_once"
    if step != at_step or rank != fail_rank % world or marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()
    if mode == "kill_generator":
        import ray

        if "generator" not in context:
            raise ValueError("mode kill_generator needs a loop with generator actors (vBoN)")
        log.warning("rank %d: killing its generator actor at step %d", rank, step)
        ray.kill(context["generator"], no_restart=False)
        return
    if mode == "sigkill":
        log.warning("rank %d: SIGKILL to itself at step %d", rank, step)
        os.kill(os.getpid(), signal.SIGKILL)
    raise RuntimeError(f"injected failure at step {step - 1} (tests.plugins.faults.fail_once)")
