"""The `sweetspot` console command (jobs/cli.py): the installed script lists every job, sweep,
benchmark and the server, and hands the rest of the command line to the one named."""
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(sys.executable).parent / "sweetspot"


def sweetspot(*args):
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[1])


@pytest.mark.skipif(not SCRIPT.exists(), reason="the package is not installed with its scripts (make install does it)")
def test_the_console_command_lists_and_runs_the_jobs():
    from jobs.catalog import stages

    out = sweetspot("--help")
    assert out.returncode == 0
    listed = {line.split()[0] for line in out.stdout.splitlines() if line.startswith("  ")}
    assert set(stages()) | {"pipeline", "report", "tune.dera", "tune.train", "serve", "bench.generate"} <= listed
    assert "Best-of-n sampling over a prompt set" in out.stdout
    bad = sweetspot("bon", "--config", "configs/nope.yaml")  # the job's own error, before any work
    assert bad.returncode == 2 and "config field '--config': expected an existing YAML file" in bad.stderr + bad.stdout
    unknown = sweetspot("bonn")
    assert unknown.returncode == 2 and "unknown command 'bonn'; one of: bench.generate" in unknown.stderr
    assert "--config" in sweetspot("train_dpo", "--help").stdout
