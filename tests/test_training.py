"""The DeepSpeed training loop under Ray Train, on a tiny model: data-parallel equivalence, checkpoint
and resume, failure recovery, and TR-DPO reference updates under ZeRO-0 and ZeRO-3."""
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from align.runtime.config import load_config
from jobs.train_dpo import DpoJobConfig
from jobs.train_dpo import run as run_dpo

pytestmark = pytest.mark.ray

PAIRS = [
    ("the movie was", " great and wonderful .", " awful and terrible ."),
    ("a good film", " with a lovely cast .", " with a bad ending ."),
    ("the plot", " is fine and good .", " is weak and awful ."),
    ("the music is", " lovely .", " terrible ."),
    ("the cast", " was wonderful .", " was weak ."),
    ("a bad", " start but a great end .", " film and a bad end ."),
    ("the story", " is lovely .", " is awful ."),
    ("the acting", " was great .", " was terrible ."),
]


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n" for p, c, r in PAIRS))
    return path


def dpo_config(tmp_path, tiny_lm_dir, pairs_file, name, *overrides):
    return load_config(DpoJobConfig, "configs/train_dpo.yaml", [
        f"model={tiny_lm_dir}", f"data.source={pairs_file}", f"output_dir={tmp_path / name}",
        f"train.run.name={name}", f"train.run.storage_path={tmp_path / 'runs'}", "train.steps=4",
        "train.batch_size=4", "train.run.checkpoint_every=2", "train.run.log_every=1", "train.optim.lr=1e-2",
        "train.optim.warmup_steps=1", "train.optim.grad_clip=1.0", "train.workers.collective_timeout_s=30",
        "dpo.ref_update=soft", "dpo.ref_alpha=0.5", "dpo.ref_tau=1", *overrides,
    ])


def weights(cfg) -> dict:
    from pathlib import Path

    return load_file(str(Path(cfg.output_dir) / "model" / "model.safetensors"))


def last_reference(cfg) -> dict:
    from pathlib import Path

    ckpts = sorted(p for p in (Path(cfg.train.run.storage_path) / cfg.train.run.name).glob("checkpoint_*") if p.is_dir())
    return load_file(str(ckpts[-1] / "reference.safetensors"))


def history(cfg):
    from actors.train_launcher import read_history

    return read_history(cfg.output_dir)


def key_bias_noise(name: str, t: torch.Tensor) -> torch.Tensor:
    """The entries of a GPT-2 c_attn bias that belong to the keys. A key bias adds q . b_k to every
    score of a query alike, so softmax cancels it and its gradient is 0 in exact arithmetic: what it
    receives is rounding noise, which Adam normalises into real steps. Runs that reduce gradients in
    a different order (ZeRO-0 vs ZeRO-3, one worker vs two) drift apart there and nowhere else."""
    mask = torch.zeros_like(t, dtype=torch.bool)
    if name.endswith("attn.c_attn.bias"):
        n = t.shape[0] // 3
        mask[n : 2 * n] = True
    return mask


def assert_same(a: dict, b: dict, atol=0.0):
    """Equal state dicts: bit for bit (atol 0), or to atol everywhere but the key biases (key_bias_noise)."""
    assert a.keys() == b.keys()
    for k in a:
        if atol == 0.0:
            assert torch.equal(a[k], b[k]), k
        else:
            keep = ~key_bias_noise(k, a[k])
            torch.testing.assert_close(a[k][keep], b[k][keep], atol=atol, rtol=0, msg=lambda m: f"{k}: {m}")


def mlflow_run(cfg):
    """The MLflow run of a training job's output directory, read back from its file store."""
    from pathlib import Path

    from mlflow.tracking import MlflowClient

    from actors.tracking import MLFLOW_RUN_FILE, mlflow_uri

    run_id = json.loads((Path(cfg.output_dir) / MLFLOW_RUN_FILE).read_text())["run_id"]
    return MlflowClient(tracking_uri=mlflow_uri(Path(cfg.output_dir))).get_run(run_id)


def mlflow_history(cfg, key: str) -> list:
    from pathlib import Path

    from mlflow.tracking import MlflowClient

    from actors.tracking import mlflow_uri

    history = MlflowClient(tracking_uri=mlflow_uri(Path(cfg.output_dir))).get_metric_history(mlflow_run(cfg).info.run_id, key)
    return sorted(history, key=lambda m: (m.step, m.timestamp))


def metric_steps(cfg, key: str) -> list[int]:
    return sorted({m.step for m in mlflow_history(cfg, key)})


@pytest.fixture(scope="module")
def baseline(ray_session, tmp_path_factory, tiny_lm_dir, pairs_file):
    """Soft TR-DPO, 2 workers, ZeRO-0, 4 steps without interruption: the run the others must match;
    tracked to TensorBoard and MLflow."""
    cfg = dpo_config(tmp_path_factory.mktemp("base"), tiny_lm_dir, pairs_file, "base", "train.run.tracking=tensorboard+mlflow")
    run_dpo(cfg)
    return cfg


def test_training_moves_every_parameter_and_logs(baseline, tiny_lm_dir):
    from transformers import AutoModelForCausalLM

    start = AutoModelForCausalLM.from_pretrained(str(tiny_lm_dir)).state_dict()
    end = weights(baseline)
    unchanged = [k for k in end if torch.equal(start[k], end[k])]
    assert unchanged == [], "a few steps at a large learning rate move every parameter"
    rows = history(baseline)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6), "policy = reference at step 1: DPO loss is log 2"
    assert all(r["tokens_per_s"] > 0 and "rewards/margins" in r for r in rows)
    assert rows[0]["lr"] == 0.0 and rows[1]["lr"] == pytest.approx(1e-2)  # linear warmup of 1 step, then decay
    # The same rows as TensorBoard events (train.run.tracking), read back from the event files.
    from pathlib import Path

    from conftest import tensorboard_scalars

    scalars = tensorboard_scalars(Path(baseline.output_dir) / "tensorboard")
    assert [s for s, _ in scalars["loss"]] == [1, 2, 3, 4]
    assert [v for _, v in scalars["loss"]] == pytest.approx([r["loss"] for r in rows], rel=1e-6)
    assert {"lr", "tokens_per_s", "rewards/margins"} <= set(scalars)
    # And as an MLflow run in the local file store (tensorboard+mlflow), its parameters the run's config.
    run = mlflow_run(baseline)
    assert run.info.status == "FINISHED" and run.info.run_name == "base"
    assert run.data.params["objective"] == "preference" and run.data.params["params.beta"] == "0.1" and run.data.params["train.steps"] == "4"
    assert [m.value for m in mlflow_history(baseline, "loss")] == pytest.approx([r["loss"] for r in rows], rel=1e-6)


def test_two_workers_equal_one_rank_in_the_driver_accumulating_two_micro_batches(baseline, tmp_path, tiny_lm_dir,
                                                                                pairs_file):
    """Each optimizer step of the baseline (2 workers x 2 pairs) equals one rank's 2 micro-batches of 2
    pairs (gradient accumulation) with gradient checkpointing on, that rank the driver itself (Ray Train's
    local mode, workers.num_workers 0): same losses, same weights after 4 steps."""
    one = dpo_config(tmp_path, tiny_lm_dir, pairs_file, "one", "train.workers.num_workers=0", "train.micro_batches=2",
                     "train.gradient_checkpointing=true")
    run_dpo(one)
    for a, b in zip(history(one), history(baseline)):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
    assert_same(weights(one), weights(baseline), atol=1e-5)


@pytest.fixture(scope="module")
def uninterrupted(ray_session, tmp_path_factory, tiny_lm_dir, pairs_file):
    """The baseline's run under ZeRO stage k, made once per module: what a killed run must equal."""
    runs = {}

    def get(stage: int):
        if stage not in runs:
            runs[stage] = dpo_config(tmp_path_factory.mktemp(f"z{stage}"), tiny_lm_dir, pairs_file, f"z{stage}",
                                     f"train.deepspeed.zero_stage={stage}")
            run_dpo(runs[stage])
        return runs[stage]

    return get


@pytest.mark.slow
# One variant: rank 0 (the one that writes checkpoints and reports) under ZeRO-3 (sharded state). A
# restart under ZeRO-2 is the DPO job's in tests/test_train_jobs.py (an injected exception).
@pytest.mark.parametrize("rank, stage", [(0, 3)])
def test_worker_killed_by_sigkill_restarts_and_ends_bit_identical(uninterrupted, tmp_path, tiny_lm_dir, pairs_file, rank, stage,
                                                                   capsys):
    """A training worker process killed with SIGKILL during step 3 (no exception, no cleanup, as when a
    node dies): the group restarts from the step-2 checkpoint within the collective timeout, and the
    run ends with the same weights and reference, bit for bit, as an uninterrupted one."""
    cfg = dpo_config(tmp_path, tiny_lm_dir, pairs_file, "killed", "train.step_hook.target=tests.plugins.faults:fail_once",
                     f"train.step_hook.args={{at_step: 3, fail_rank: {rank}, mode: sigkill}}", "train.run.max_failures=1", f"train.deepspeed.zero_stage={stage}")
    run_dpo(cfg)
    assert (tmp_path / "killed" / ".failed_once").exists(), "the worker was killed"
    steps = [json.loads(line)["step"] for line in (tmp_path / "killed" / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4], "restarted at the step-2 checkpoint, so step 3 ran once, after the kill"
    console = capsys.readouterr().out
    assert "[train] workers restarted: resuming at step 2 of 4 (from checkpoint_000002)" in console, console
    assert_same(weights(cfg), weights(uninterrupted(stage)))
    assert_same(last_reference(cfg), last_reference(uninterrupted(stage)))


def test_soft_update_same_under_zero3(baseline, uninterrupted, tiny_lm_dir):
    z3 = uninterrupted(3)
    ref3, ref0 = last_reference(z3), last_reference(baseline)
    start = load_file(str(tiny_lm_dir / "model.safetensors"))
    assert any(not torch.equal(ref0[k], start[k]) for k in start), "the reference moved"
    assert_same(ref3, ref0, atol=1e-5)
    assert_same(weights(z3), weights(baseline), atol=1e-5)


def checkpoint_dirs(cfg):
    from pathlib import Path

    run = Path(cfg.train.run.storage_path) / cfg.train.run.name
    return sorted((p.name, (p / ".complete").exists()) for p in run.glob("checkpoint_*") if p.is_dir())


def test_rerun_under_another_config_stops_naming_the_keys(ray_session, tmp_path, tiny_lm_dir, pairs_file):
    from align.runtime.runstate import StaleStateError

    common = ["train.workers.num_workers=0", "train.steps=2", "train.run.checkpoint_every=1", "dpo.ref_update=none"]
    first = dpo_config(tmp_path, tiny_lm_dir, pairs_file, "stale", *common, "dpo.beta=0.1")
    run_dpo(first)
    before = (tmp_path / "stale" / "train_log.jsonl").read_text()
    changed = dpo_config(tmp_path, tiny_lm_dir, pairs_file, "stale", *common, "dpo.beta=0.5", "train.steps=3")
    with pytest.raises(StaleStateError) as err:
        run_dpo(changed)
    assert "params.beta: 0.1 -> 0.5" in str(err.value) and "train.steps: 2 -> 3" in str(err.value)
    assert "resume=never" in str(err.value)
    assert (tmp_path / "stale" / "train_log.jsonl").read_text() == before, "nothing was touched"
    assert checkpoint_dirs(first) == [("checkpoint_000001", True), ("checkpoint_000002", True)]
    # The same command with resume=never starts over: one run's rows, one run's checkpoints.
    fresh = dpo_config(tmp_path, tiny_lm_dir, pairs_file, "stale", *common, "dpo.beta=0.5", "train.steps=3", "train.run.resume=never")
    run_dpo(fresh)
    assert [r["step"] for r in history(fresh)] == [1, 2, 3]
    assert checkpoint_dirs(fresh) == [("checkpoint_000002", True), ("checkpoint_000003", True)]
    with pytest.raises(StaleStateError, match="nothing to resume"):
        run_dpo(dpo_config(tmp_path, tiny_lm_dir, pairs_file, "never_ran", *common, "train.run.resume=must"))


def test_resumes_from_the_newest_complete_checkpoint_not_the_registered_one(baseline, tmp_path, tiny_lm_dir, pairs_file,
                                                                            capsys):
    """A run that failed (max_failures 0), run again with the same name, resumes. Ray Train's controller
    may know only an older checkpoint than the newest complete one (a worker killed after writing,
    before the controller registered it): the run resumes from the newest
    complete one, clears a half-written one, and keeps no more than keep_checkpoints. A complete one
    corrupted on disk afterwards is named, removed, and the run resumes from the one before."""
    from pathlib import Path

    failing = dpo_config(tmp_path, tiny_lm_dir, pairs_file, "orphan", "train.step_hook.target=tests.plugins.faults:fail_once", "train.step_hook.args={at_step: 3}", "train.run.max_failures=0",
                         "train.run.checkpoint_every=1", "train.run.tracking=mlflow")
    with pytest.raises(Exception, match="injected failure"):
        run_dpo(failing)
    failed_run = mlflow_run(failing)
    assert failed_run.info.status == "FAILED" and metric_steps(failing, "loss") == [1, 2]
    run = Path(failing.train.run.storage_path) / "orphan"
    assert checkpoint_dirs(failing) == [("checkpoint_000001", True), ("checkpoint_000002", True)]
    snapshot = run / "checkpoint_manager_snapshot.json"
    state = json.loads(snapshot.read_text())  # make the controller forget checkpoint 2 ...
    state["checkpoint_results"] = state["checkpoint_results"][:1]
    state["checkpoint_report_indices"] = state["checkpoint_report_indices"][:1]
    state["checkpoint_results"][0]["checkpoint_dir_name"] = "checkpoint_000000"  # ... and know one pruned since
    state["latest_checkpoint_result"] = state["checkpoint_results"][0]
    snapshot.write_text(json.dumps(state))
    (run / "checkpoint_000009").mkdir()  # half-written by a rank that died: no marker
    (run / "checkpoint_000009" / "junk").write_text("x")
    again = dpo_config(tmp_path, tiny_lm_dir, pairs_file, "orphan", "train.run.checkpoint_every=1", "train.run.tracking=mlflow")
    run_dpo(again)
    assert [r["step"] for r in history(again)] == [1, 2, 3, 4], "step 2 was not redone"
    # The resumed run continues the same MLflow run, from the checkpoint's step on.
    assert mlflow_run(again).info.run_id == failed_run.info.run_id and mlflow_run(again).info.status == "FINISHED"
    assert metric_steps(again, "loss") == [1, 2, 3, 4]
    assert_same(weights(again), weights(baseline))
    assert checkpoint_dirs(again) == [("checkpoint_000003", True), ("checkpoint_000004", True)]

    # The newest checkpoint truncated on disk: the rerun names it, resumes from the one before, redoes
    # step 4 and ends where it did.
    shard = max((run / "checkpoint_000004").rglob("*model_states.pt"), key=lambda p: p.stat().st_size)
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    capsys.readouterr()
    run_dpo(again)
    out = capsys.readouterr().out
    assert f"checkpoint {run / 'checkpoint_000004'} is corrupted ({shard.relative_to(run / 'checkpoint_000004')} has" in out
    assert f"resuming from {run / 'checkpoint_000003'}" in out
    assert [r["step"] for r in history(again)] == [1, 2, 3, 4]
    assert_same(weights(again), weights(baseline))
    assert checkpoint_dirs(again) == [("checkpoint_000003", True), ("checkpoint_000004", True)]


def test_bf16_training_saves_the_fp32_master_weights(ray_session, tmp_path, tiny_lm_dir, pairs_file):
    common = ["train.workers.num_workers=0", "train.steps=3", "train.deepspeed.bf16=true", "dpo.ref_update=none",
              "train.deepspeed.zero_stage=1"]
    cfg = dpo_config(tmp_path, tiny_lm_dir, pairs_file, "bf16", *common)
    run_dpo(cfg)
    w = weights(cfg)
    assert all(v.dtype == torch.float32 for v in w.values())
    moved = w["transformer.h.0.attn.c_attn.weight"]
    assert (moved != moved.bfloat16().float()).any(), "fp32 master weights, not the bf16 module copy"
    half = dpo_config(tmp_path, tiny_lm_dir, pairs_file, "bf16_saved", *common, "train.save_dtype=bfloat16")
    run_dpo(half)
    assert all(v.dtype == torch.bfloat16 for v in weights(half).values())
    torch.testing.assert_close(weights(half)["transformer.h.0.attn.c_attn.weight"], moved.bfloat16(), atol=0, rtol=0)


def test_frozen_reference_log_probs_computed_on_the_workers_under_zero3(ray_session, tmp_path, tiny_lm_dir, pairs_file):
    """DPO against a frozen reference: its log-probs are computed by the workers at step 0 (each rank
    a share, then gathered), and ZeRO-3 with two workers, the optimizer states and the parameters offloaded
    to CPU memory (train.deepspeed.offload_*), gives what one ZeRO-0 worker gives. The
    validation pass (train.eval_every) reports the DPO loss of the held-out pairs under the trained
    policy and pi_0, as computed here from the saved model."""
    from align.objectives.base import pair_logps
    from align.objectives.preference import PreferenceObjective
    from align.engine.models import load_causal_lm, load_tokenizer
    from align.data.pairs import collate_packed_pairs
    from jobs.training import load_pair_dataset, tokenize_pairs

    common = ["dpo.ref_update=none", "dpo.precompute_reference=true", "train.steps=3", "train.eval_every=3",
              "data.eval_split=test"]
    z3 = dpo_config(tmp_path, tiny_lm_dir, pairs_file, "frozen_z3", *common, "train.deepspeed.zero_stage=3",
                    "train.deepspeed.offload_optimizer=true", "train.deepspeed.offload_params=true")
    z0 = dpo_config(tmp_path, tiny_lm_dir, pairs_file, "frozen_z0", *common, "train.workers.num_workers=0")
    run_dpo(z3)
    run_dpo(z0)
    assert history(z3)[0]["loss"] == pytest.approx(math.log(2), abs=1e-6), "reference = policy at step 1"
    for a, b in zip(history(z3), history(z0)):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
    assert_same(weights(z3), weights(z0), atol=1e-5)

    tok = load_tokenizer(str(tiny_lm_dir))
    pairs = tokenize_pairs(load_pair_dataset(z0.data), tok, z0.train.max_length)
    batch = collate_packed_pairs([pairs[i] for i in range(len(pairs))], tok.pad_token_id)
    policy, _ = load_causal_lm(z0.output_dir + "/model", device="cpu")
    reference, _ = load_causal_lm(str(tiny_lm_dir), device="cpu")
    with torch.no_grad():
        batch["ref_chosen_logps"], batch["ref_rejected_logps"], _ = pair_logps(reference, batch, tok.eos_token_id)
        loss, metrics = PreferenceObjective(beta=z0.dpo.beta).compute_loss(policy, None, batch, tok.eos_token_id)
    for cfg in (z0, z3):
        last = history(cfg)[-1]
        assert last["val/loss"] == pytest.approx(loss.item(), abs=1e-5)
        assert last["val/rewards/accuracies"] == pytest.approx(metrics["rewards/accuracies"].item(), abs=1e-6)


def test_key_bias_gradient_is_zero_in_exact_arithmetic():
    """Why assert_same leaves key biases out: in float64 their gradient vanishes (softmax cancels them)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=40, n_layer=1, n_embd=16, n_head=2, n_positions=16)).double()
    ids = torch.randint(0, 40, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    grad = model.transformer.h[0].attn.c_attn.bias.grad
    mask = key_bias_noise("h.0.attn.c_attn.bias", grad)
    assert grad[mask].abs().max() < 1e-15 < grad[~mask].abs().max()


def test_lora_with_a_live_tr_dpo_reference_is_refused_before_any_work(tmp_path, tiny_lm_dir, pairs_file):
    """A soft or hard TR-DPO reference update copies full weights, which LoRA does not train. (LoRA itself
    trains through Ray Train in tests/test_chat.py, on the instruct model.)"""
    from align.runtime.config import ConfigError

    for update in ("soft", "hard"):
        with pytest.raises(ConfigError, match="lora.enabled"):
            run_dpo(dpo_config(tmp_path, tiny_lm_dir, pairs_file, "lora_live", "lora.enabled=true", f"dpo.ref_update={update}"))
    assert not (tmp_path / "lora_live").exists(), "refused before anything is written"


def test_progress_lines_carry_an_eta_from_the_pace_since_the_workers_started(capsys):
    """The driver's progress printer: one line per logged step, and once two rows arrived at different
    times, the steps left at that pace (here 2 steps per 10 s, 6 steps left: 30 s); a restart resets it."""
    from actors.train_launcher import LOG_FILE, START_FILE, ProgressPrinter

    files = {LOG_FILE: "", START_FILE: ""}

    class FakeRunDir:
        def read_text(self, name):
            return files[name]

    now = [100.0]
    printer = ProgressPrinter(FakeRunDir(), total_steps=10, clock=lambda: now[0])
    files[START_FILE] = json.dumps({"step": 0, "checkpoint": None}) + "\n"
    for step in (2, 4):
        files[LOG_FILE] += json.dumps({"step": step, "loss": 0.5}) + "\n"
        printer.poll()
        now[0] += 10.0
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["  [train] step 2/10 loss 0.5", "  [train] step 4/10 loss 0.5 eta 0m30s"]
    files[START_FILE] += json.dumps({"step": 2, "checkpoint": "run/checkpoint_000002"}) + "\n"
    files[LOG_FILE] += json.dumps({"step": 6, "loss": 0.4}) + "\n"
    printer.poll()
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("  [train] workers restarted: resuming at step 2") and "eta" not in out[-1]


def test_a_warmup_as_long_as_the_run_is_said_with_the_peak_it_reaches(caplog):
    from actors.train_config import OptimConfig, TrainConfig
    from actors.train_loop import linear_schedule

    with caplog.at_level("WARNING", logger="sweetspot.train"):
        TrainConfig(steps=4, optim=OptimConfig(lr=1e-3, warmup_steps=10))
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule, lrs = linear_schedule(4, 10)(opt), []
    for _ in range(4):  # the lr each of the 4 steps runs at
        lrs.append(opt.param_groups[0]["lr"])
        opt.step(), schedule.step()
    peak = max(lrs)
    assert peak == pytest.approx(0.3)
    assert f"optim.warmup_steps (10) >= steps (4): the learning rate never leaves warmup and peaks at {peak:.3g} x optim.lr" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="sweetspot.train"):
        TrainConfig(steps=40, optim=OptimConfig(lr=1e-3, warmup_steps=10))
    assert caplog.text == ""
