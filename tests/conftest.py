"""Shared fixtures: one Ray per test session, tiny models saved to disk, the small default task."""
from __future__ import annotations

import os

# Quiet, offline, and no token-auth file under ~/.ray; set before ray/transformers are imported.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ray Train's controller polls its workers every 2 s by default: a finished run, and every checkpoint
# report, waits for the next poll. A tighter poll takes about 10 s off each training test.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
# This environment's tools first, for this process and every one it starts, as in an activated venv:
# DeepSpeed JIT-builds its shm op with whichever `ninja` is on PATH, and two ninja versions take each
# other's build for stale, so mixing the system's and the venv's rebuilt it (30 s) at each switch.
_bin = os.path.dirname(os.path.abspath(__import__("sys").executable))
if os.environ.get("PATH", "").split(os.pathsep)[0] != _bin:
    os.environ["PATH"] = _bin + os.pathsep + os.environ.get("PATH", "")

import pytest
import torch

TINY_TEXTS = [
    "the movie was great and the acting was wonderful .",
    "the plot was awful and the pacing was terrible .",
    "a good film with a bad ending .",
    "the story is fine , the music is lovely , the cast is weak .",
]


def save_tiny_lm(path, vocab_size: int = 64, seed: int = 0):
    """A random 2-layer GPT-2 and a word-level tokenizer, saved in HF format at `path`."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TINY_TEXTS * 4, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<unk>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>", pad_token="<|endoftext|>", unk_token="<unk>")
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=fast.vocab_size, n_layer=2, n_embd=32, n_head=2, n_positions=128,
                     bos_token_id=fast.eos_token_id, eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id)
    model = GPT2LMHeadModel(cfg)
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory):
    return save_tiny_lm(tmp_path_factory.mktemp("tiny_lm"))


def tensorboard_scalars(logdir) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the TensorBoard event files under `logdir`, read back from the files themselves
    (TFRecord framing: 8-byte length, 4-byte CRC, the Event proto, 4-byte CRC): tag -> [(step, value)]."""
    import struct
    from pathlib import Path

    from tensorboardX.proto.event_pb2 import Event

    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(Path(logdir).rglob("events.out.tfevents.*")):
        data, pos = path.read_bytes(), 0
        while pos + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            event = Event.FromString(data[pos + 12 : pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                out.setdefault(value.tag, []).append((event.step, value.simple_value))
    return out


def save_tiny_rm(path, lm_dir, seed: int = 1):
    """A random GPT2ForSequenceClassification (one label) on the tiny LM's tokenizer, saved at `path`;
    its score head is large enough that different inputs score clearly apart."""
    from transformers import AutoTokenizer, GPT2Config, GPT2ForSequenceClassification

    tok = AutoTokenizer.from_pretrained(lm_dir)
    cfg = GPT2Config.from_pretrained(lm_dir)
    cfg.num_labels = 1
    torch.manual_seed(seed)
    model = GPT2ForSequenceClassification(cfg)
    model.config.pad_token_id = tok.pad_token_id
    with torch.no_grad():
        model.score.weight.normal_(0.0, 1.0)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_ensemble_dir(tiny_lm_dir, tmp_path_factory):
    """An ensemble directory as jobs.train_rm writes it: three tiny reward models (members 0 and 2
    identical, seed 1; member 1 seed 2) and ensemble.json."""
    import json

    root = tmp_path_factory.mktemp("tiny_ensemble")
    for i, seed in enumerate((1, 2, 1)):
        save_tiny_rm(root / f"member_{i}" / "model", tiny_lm_dir, seed)
    (root / "ensemble.json").write_text(json.dumps({"members": [f"member_{i}/model" for i in range(3)]}))
    return root


from actors.cluster import free_ports  # noqa: E402,F401 - the tests import it from here


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the whole session, started as a real one is (`ray start --head`, with
    the job server on loopback, every port chosen here so it cannot clash with another Ray on the
    machine): 4 CPUs, a 100 MB object store. Stopped by SIGTERM to its `ray start --block` process,
    which takes down this cluster only. Yields (GCS address, job server URL)."""
    import signal
    import subprocess
    import sys
    import tempfile
    import time
    import urllib.request
    from pathlib import Path

    bin_dir = Path(sys.executable).parent
    gcs, dash, *more = free_ports(11)
    # Worker ports: a 101-port range clear of every port chosen above (Ray refuses overlaps).
    low = 20000 + (more[-2] % 20000)
    while any(low <= p <= low + 100 for p in (gcs, dash, *more)):
        low += 101
    temp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths have a length limit
    flags = ["--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--runtime-env-agent-port",
             "--metrics-export-port", "--ray-client-server-port", "--node-manager-port", "--object-manager-port"]
    cmd = [str(bin_dir / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--include-dashboard=true",
           *[f"{f}={p}" for f, p in zip(flags, more)], f"--min-worker-port={low}",
           f"--max-worker-port={low + 100}", "--num-cpus=4", f"--object-store-memory={100 * 1024**2}",
           f"--temp-dir={temp}", "--disable-usage-stats"]
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    log = open(Path(temp) / "ray_start.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url, deadline = f"http://127.0.0.1:{dash}", time.time() + 120
    while True:
        try:
            urllib.request.urlopen(f"{url}/api/version", timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise RuntimeError("ray start failed: " + (Path(temp) / "ray_start.log").read_text()[-3000:])
            time.sleep(0.5)
    yield f"127.0.0.1:{gcs}", url
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=2)  # a clean stop takes Ray ~30 s; what is left of this session's cluster is killed
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # its own session (start_new_session): this cluster's processes only
    except ProcessLookupError:
        pass
    proc.wait()
    log.close()


@pytest.fixture(scope="session")
def ray_session(ray_cluster):
    """This test process joined to the session's cluster, with quiet logs."""
    import ray

    ray.init(address=ray_cluster[0], log_to_driver=False, logging_level="ERROR", configure_logging=False,
             logging_config=ray.LoggingConfig(log_level="ERROR"))
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def small_task():
    """The default task at its reduced test size, cached in the repo's .sweetspot_cache across runs."""
    from align.task.default_task import DefaultTaskConfig, ensure_default_task

    return ensure_default_task(DefaultTaskConfig.small(), progress=False)


@pytest.fixture(scope="session")
def small_pairs(ray_session, small_task, tmp_path_factory):
    """jobs.make_pairs on the small default task: best/worst and random pair datasets, train and test."""
    from align.runtime.config import load_config
    from jobs.make_pairs import MakePairsConfig, run

    out = tmp_path_factory.mktemp("pairs")
    cfg = load_config(MakePairsConfig, "configs/make_pairs.yaml", [
        f"bon.model.path={small_task.policy_dir}", f"bon.prompts.source={small_task.root / 'prompts'}",
        "bon.prompts.limit=16", "bon.prompts.repeats=1", "bon.sampling.n=4", "bon.sampling.max_new_tokens=16",
        "bon.pool.num_actors=2", "bon.pool.batch_size=8", f"output_dir={out}",
    ])
    run(cfg)
    return out
