"""Experiment tracking of training runs: each row rank 0 logs, as it reaches the driver, also goes to
TensorBoard event files in `<output_dir>/tensorboard/` (tensorboardX, a dependency), so
`tensorboard --logdir outputs` shows every run's curves (loss, accuracies, KL, lr, tokens/s) and a
Tune sweep's trials beside Tune's own event files. train.run.tracking: tensorboard | none.
"""
from __future__ import annotations

import math
from pathlib import Path

TB_DIR = "tensorboard"


class Tracker:
    """One run's tracking sinks; `log(row)` writes every finite number of a train_log.jsonl row at its
    step; `close()` flushes. (A run started over has its old event files removed: actors.train_launcher.prepare_run.)"""

    def __init__(self, mode: str, output_dir: Path):
        self.writer = None
        if mode == "none":
            return
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(logdir=str(Path(output_dir) / TB_DIR), flush_secs=10)

    def log(self, row: dict) -> None:
        if self.writer is None:
            return
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                self.writer.add_scalar(key, value, row["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
