"""Jobs submitted to a Ray cluster with `ray job submit --working-dir .`, as a user does: the upload
leaves out the virtual environment and caches, the job finishes, and its outputs land under the
output root (~/sweetspot for a submitted job), not in Ray's temporary copy of the working directory."""
import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]


def submit(ray_cluster, home: Path, *entrypoint: str) -> str:
    """Submit and wait; returns the job's log. The job's HOME is a temporary directory, so its
    default output root ~/sweetspot lands there."""
    ray = str(Path(sys.executable).parent / "ray")
    env = {**os.environ, "RAY_ADDRESS": ray_cluster[1]}
    runtime = {"env_vars": {"HOME": str(home)}}
    done = subprocess.run([ray, "job", "submit", "--working-dir", str(REPO), "--runtime-env-json", json.dumps(runtime),
                           "--", *entrypoint], capture_output=True, text=True, env=env, timeout=540, cwd=REPO)
    assert done.returncode == 0 and "succeeded" in done.stdout.lower(), done.stdout[-4000:] + done.stderr[-2000:]
    return done.stdout


def test_submitted_bon_job_writes_where_it_outlives_the_job(ray_cluster, small_task, tmp_path):
    log = submit(ray_cluster, tmp_path, "bash", "-c",
                 "ls -a; python -m jobs.bon --config configs/bon.yaml "
                 f"model.path={small_task.policy_dir} prompts.source={small_task.root / 'prompts'} prompts.limit=4 "
                 "prompts.repeats=1 sampling.n=2 sampling.max_new_tokens=8 sampling.min_new_tokens=8 pool.num_actors=1 "
                 "output_dir=outputs/submitted_bon")
    listing = log.split("default task")[0] if "default task" in log else log
    for left_out in (".venv", ".sweetspot_cache", ".cache", ".git", "outputs"):
        assert f"\n{left_out}\n" not in listing, f"{left_out} was uploaded with the working directory"
    out = tmp_path / "sweetspot" / "outputs" / "submitted_bon"
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(len(r["completion_ids"]) == 2 for r in rows)
    assert f"wrote {out / 'samples.jsonl'}" in log, "the job says where its outputs are"


def test_submitted_training_job_reads_its_data_through_ray(ray_cluster, tiny_lm_dir, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": p, "chosen": " good .", "rejected": " bad ."}) + "\n"
                             for p in ("the movie", "a film", "the plot", "the cast")))
    log = submit(ray_cluster, tmp_path, "python", "-m", "jobs.train_dpo", "--config", "configs/train_dpo.yaml",
                 f"model={tiny_lm_dir}", f"data.source={pairs}", "train.steps=2", "train.batch_size=2",
                 "train.workers.num_workers=1", "train.run.log_every=1", "train.workers.collective_timeout_s=30",
                 "output_dir=outputs/submitted_dpo")
    root = tmp_path / "sweetspot" / "outputs"
    assert (root / "submitted_dpo" / "model" / "model.safetensors").exists()
    assert (root / "runs" / "dpo" / "checkpoint_000002" / ".complete").exists()
    assert [json.loads(line)["step"] for line in (root / "submitted_dpo" / "train_log.jsonl").read_text().splitlines()] == [1, 2]
    assert f"outputs in {root / 'submitted_dpo'}" in log


LOCAL_RAY = """
import logging, socket, sys
import psutil
import ray
import ray._private.utils
from actors.cluster import init_ray

logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
dead = socket.socket(); dead.bind(("127.0.0.1", 0)); port = dead.getsockname()[1]; dead.close()  # nothing listens
try:
    init_ray(f"127.0.0.1:{port}", connect_timeout_s=1)
except ConnectionError as e:
    print("REFUSED", e)
ray._private.utils.read_ray_address = lambda temp_dir=None: f"127.0.0.1:{port}"  # a recorded cluster, now gone
assert init_ray() is True
logging.getLogger("sweetspot.test").info("a job's own INFO line, after Ray started")
ours = {p.pid for p in psutil.Process().children(recursive=True)} | {psutil.Process().pid}
listening = {(c.laddr.ip, c.laddr.port) for c in psutil.net_connections("inet") if c.status == psutil.CONN_LISTEN and c.pid in ours}
print("LISTENING", sorted(listening))
ray.shutdown()
"""


def test_a_job_on_a_gone_cluster_says_so_and_starts_its_own():
    """Nothing answers at an address: a ConnectionError naming it within the timeout (not Ray's endless
    retries). A recorded local cluster that is gone: said so, and a new Ray starts here, with a line
    saying so. Its listening sockets are printed (docs/security.md records them: Ray 2.60's servers
    listen on every interface whatever the node address, so the boundary must be the network's)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = subprocess.run([sys.executable, "-c", LOCAL_RAY], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=180).stdout
    assert "REFUSED ray_address / RAY_ADDRESS: no Ray cluster answers at 127.0.0.1:" in out, out
    assert "is gone" in out and "started a local Ray (" in out and "node address 127.0.0.1" in out, out
    assert "a job's own INFO line, after Ray started" in out, "Ray's logging config must not silence the job's log"
    listening = ast.literal_eval(out.split("LISTENING ", 1)[1].splitlines()[0])
    assert len(listening) >= 3, listening  # the GCS, the raylet, the object manager at least


SERVE_MAIN = """
import sys
import ray._private.utils
ray._private.utils.read_ray_address = lambda temp_dir=None: None  # its own Ray, never the test session's
from serve.__main__ import main
main(sys.argv[1:])
"""


def test_python_m_serve_says_ready_only_when_it_answers_and_stops_cleanly_on_ctrl_c(tiny_lm_dir):
    """`python -m serve`: the "serving on" line comes once /healthz answers (checked the moment it is
    printed), and Ctrl-C, pressed twice, stops the app and its Ray with exit status 0 and no traceback."""
    import signal
    import time
    import urllib.request

    from conftest import free_ports

    (port,) = free_ports(1)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen([sys.executable, "-c", SERVE_MAIN, "--model", str(tiny_lm_dir), "--port", str(port)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if "serving on" in line:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
                    assert r.status == 200, "the ready line came before the app answered"
                break
        assert any("serving on" in x for x in lines), "".join(lines) + proc.stderr.read()
        proc.send_signal(signal.SIGINT)
        time.sleep(0.5)  # pressed again, impatient, while it shuts down
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0 and "Traceback" not in err, err[-3000:]
    assert "stopping: the app, then the Ray this command started" in out
