"""What every benchmark shares: the machine it ran on, timing with the device synchronised, peak
memory of one call, and `publish` (the table printed for people and written as markdown)."""
from __future__ import annotations

import platform
import time
from pathlib import Path
from typing import Callable

import torch

from jobs.tables import format_table, write_results


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: torch.device) -> dict:
    """The facts a reader needs to compare figures across runs."""
    import os

    import transformers

    info = {"device": str(device), "cpu": cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        import ray

        info["ray"] = ray.__version__
    except ImportError:
        pass
    return info


def machine_line(info: dict) -> str:
    where = info.get("gpu") or f"{info['cpu']}, {info['torch_threads']} threads"
    versions = ", ".join(f"{k} {info[k]}" for k in ("torch", "transformers", "ray") if k in info)
    return f"{info['device']} ({where}); {versions}"


def time_call(f: Callable, device: torch.device, *args) -> tuple[float, object]:
    """Seconds for f(*args), the device synchronised on both sides, and its result."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = f(*args)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, out


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def peak_memory_mb(f: Callable, device: torch.device) -> float | None:
    """Peak memory f() adds while it runs, in MiB: allocated CUDA memory on a GPU; on Linux CPUs the
    resident set's high-water mark (reset through /proc/self/clear_refs just before the call) minus
    the resident set before it. Run it in a fresh process: memory a previous call freed to the
    allocator but not to the OS would hide part of the peak. None where neither is available."""
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        f()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
        before = _status_kb("VmRSS")
    except (OSError, KeyError):
        return None
    f()
    return (_status_kb("VmHWM") - before) / 1024


def publish(cfg, result: dict, header: str, rows: list[dict], columns: list[tuple[str, str, str]], extra_md: str = "") -> Path:
    """Write the results (`write_results`) with `rows` as a markdown table under `header`, print the
    same table for the terminal, and return the output directory."""
    text, md = format_table(rows, columns)
    out = write_results(cfg, result, f"{header}\n\n{md}\n{extra_md}")
    print(f"\n  {header}\n\n{text}\n\n  wrote {out / 'results.md'}", flush=True)
    return out
