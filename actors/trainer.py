"""The pair objectives' worker (DPO / IPO / TR-DPO, BoNBoN, Bradley-Terry, any registered objective),
run by each Ray Train worker inside the loop shell (actors/train_loop.py) around a DeepSpeed engine
(ZeRO 0-3; bf16 on GPU, fp32 on CPU over gloo).

Each step takes a deterministic global batch (a seeded permutation per epoch) and gives rank r the
r-th contiguous slice, so W workers on slices equal one worker on the whole batch (DeepSpeed averages
the gradients). A frozen reference's log-probs are computed once, at step 0, by all ranks
(`reference_table`) and kept with every checkpoint; a TR-DPO reference is a full (unpartitioned) copy
on every rank: under ZeRO-3 the policy's parameters are gathered around the pure update in
align/math/losses. A restarted or resumed run continues bit for bit.
"""
from __future__ import annotations

import logging
import os
import warnings
from typing import TYPE_CHECKING

import torch

from actors.train_loop import batch_indices, gathered, mean_over_ranks, upload_final_model, worker_setup
from align.engine.chat import generation_eos, stop_ids_of

if TYPE_CHECKING:
    from actors.train_config import TrainConfig
    from align.objectives.base import Objective

log = logging.getLogger("sweetspot.trainer")

REF_FILE = "reference.safetensors"  # TR-DPO's moving reference weights
REF_LOGPS_FILE = "reference_logps.safetensors"  # a frozen reference's (N, 2) log-probs, computed at step 0
EVAL_REF_LOGPS_FILE = "eval_reference_logps.safetensors"  # the same for the validation pairs


def update_reference(model, ref_model, mode: str, alpha: float, zero_stage: int) -> None:
    """TR-DPO reference update; the ZeRO-3 gather is kept apart from the pure update."""
    from align.math.losses import hard_update_, soft_update_

    params = list(model.parameters())
    with gathered(params, zero_stage):
        if mode == "soft":
            soft_update_(ref_model.parameters(), params, alpha)
        else:
            hard_update_(ref_model.parameters(), params)


@torch.no_grad()
def reference_table(model, data, micro: int, pad_id: int, eos_id: int | tuple[int, ...] | None, rank: int, world: int, device,
                    collate) -> torch.Tensor:
    """(N, 2) log-probs of (chosen, rejected) for every pair under `model` at step 0, the frozen
    reference: each rank scores every world-th pair and an all-gather assembles the table, so the
    work is spread over the workers and no model runs on the driver. Every rank runs the same number
    of forwards (ZeRO-3 gathers parameters inside each one)."""
    import torch.distributed as dist

    from align.objectives.base import pair_logps

    n = len(data)
    per_rank = -(-n // world)
    mine = list(range(rank, n, world))
    mine += [-1] * (per_rank - len(mine))  # padding: scored (index 0) and dropped
    was_training = model.training
    model.eval()
    values = []
    for i in range(0, per_rank, micro):
        chunk = mine[i : i + micro]
        batch = collate([data[max(j, 0)] for j in chunk], pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        c, r, _ = pair_logps(model, batch, eos_id)
        values.append(torch.stack([c, r], 1).float())
    model.train(was_training)
    local = torch.cat(values)  # (per_rank, 2)
    index = torch.tensor(mine, device=device)
    if world > 1:
        gathered_v = [torch.empty_like(local) for _ in range(world)]
        gathered_i = [torch.empty_like(index) for _ in range(world)]
        dist.all_gather(gathered_v, local)
        dist.all_gather(gathered_i, index)
        local, index = torch.cat(gathered_v), torch.cat(gathered_i)
    table = torch.empty(n, 2)
    keep = index >= 0
    table[index[keep].cpu()] = local[keep].cpu()
    return table


class PairObjectiveSteps:
    """The offline pair objectives as a StepAlgorithm (actors.train_loop): each step a deterministic
    global batch of pairs, this rank's slice collated, the objective's loss; a frozen reference's
    log-probs computed at step 0 and kept with every checkpoint, or a live (TR-DPO) reference updated
    after the steps the objective says."""

    def __init__(self, engine, objective: Objective, ref_model, data, eval_data, tokenizer, collate, train: TrainConfig,
                 rank: int, world: int, zero_stage: int):
        self.engine, self.objective, self.ref_model, self.data, self.eval_data = engine, objective, ref_model, data, eval_data
        self.tokenizer, self.collate, self.train, self.rank, self.world, self.zero_stage = \
            tokenizer, collate, train, rank, world, zero_stage
        self.micro = train.batch_size // world // train.micro_batches  # pairs per forward/backward pass
        # every id that ends a completion (a chat model's end-of-turn ids): blocked for min_new_tokens in
        # the log-probs exactly as the sampler blocked them
        self.stop_ids = stop_ids_of(tokenizer, generation_eos(tokenizer.name_or_path)) or None
        self.ref_logps = self.eval_ref_logps = None
        self.tokens = 0
        self.hook_context: dict = {}

    def load_extra(self, d: str) -> None:
        from safetensors.torch import load_file, load_model

        if self.ref_model is not None:
            load_model(self.ref_model, os.path.join(d, REF_FILE), device=str(self.engine.device))
        if os.path.exists(os.path.join(d, REF_LOGPS_FILE)):
            self.ref_logps = load_file(os.path.join(d, REF_LOGPS_FILE))["logps"]
        if os.path.exists(os.path.join(d, EVAL_REF_LOGPS_FILE)):
            self.eval_ref_logps = load_file(os.path.join(d, EVAL_REF_LOGPS_FILE))["logps"]

    def save_extra(self, tmp: str) -> None:
        from safetensors.torch import save_file, save_model

        if self.ref_model is not None:
            save_model(self.ref_model, os.path.join(tmp, REF_FILE))
        if self.ref_logps is not None:
            save_file({"logps": self.ref_logps.contiguous()}, os.path.join(tmp, REF_LOGPS_FILE))
        if self.eval_ref_logps is not None:
            save_file({"logps": self.eval_ref_logps.contiguous()}, os.path.join(tmp, EVAL_REF_LOGPS_FILE))

    def table(self, data) -> torch.Tensor:
        return reference_table(self.engine.module, data, self.micro, self.tokenizer.pad_token_id, self.stop_ids,
                               self.rank, self.world, self.engine.device, self.collate)

    def start(self, step: int) -> None:
        if self.objective.stored_reference and self.ref_logps is None:
            self.ref_logps = self.table(self.data)
        if self.objective.stored_reference and self.eval_data is not None and self.eval_ref_logps is None:
            self.eval_ref_logps = self.table(self.eval_data)  # at step 0 (pi_0), kept like the training table

    def loss(self, step: int, part: int = 0):
        micro, share = self.micro, self.train.batch_size // self.world  # this rank's share: micro_batches parts of micro
        start = self.rank * share + part * micro
        idx = batch_indices(step, self.train.batch_size, len(self.data), self.train.seed)[start : start + micro]
        batch = self.collate([self.data[int(i)] for i in idx], self.tokenizer.pad_token_id)
        if self.ref_logps is not None:
            batch["ref_chosen_logps"], batch["ref_rejected_logps"] = self.ref_logps[idx, 0], self.ref_logps[idx, 1]
        batch = {k: v.to(self.engine.device) for k, v in batch.items()}
        self.tokens += int(batch["num_tokens"])  # prompt + completion of both sides, however they are laid out
        return self.objective.compute_loss(self.engine, self.ref_model, batch, self.stop_ids)

    def after_step(self, step: int) -> None:
        mode = self.objective.reference_update(step)
        if mode is not None:
            update_reference(self.engine.module, self.ref_model, mode, self.objective.ref_alpha, self.zero_stage)

    def window(self, seconds: float) -> dict:
        tokens, self.tokens = self.tokens, 0
        return {"tokens_per_s": tokens / max(seconds, 1e-9)}

    def finish_report(self, report: dict, step: int, last: bool) -> dict:
        report["tokens_per_s"] *= self.world  # throughput of the whole group
        every = self.train.eval_every
        if self.eval_data is not None and (step % every == 0 or last):
            report.update(validation_metrics(self.engine, self.ref_model, self.objective, self.eval_data, self.eval_ref_logps,
                                             self.micro, self.rank, self.world, self.tokenizer.pad_token_id,
                                             self.stop_ids, self.collate))
        return report


def train_worker(config: dict) -> None:
    """Ray Train `train_loop_per_worker` of the pair objectives. config: {"objective" (an
    align.objectives.base.Objective), "saved_as", "model" (a path, hub name or actors.cluster.ShippedDir),
    "data" (ObjectRef of the tokenized pairs' arrow table), "eval_data" (optional), "output_dir",
    "storage_path", "train": the TrainConfig, "lora": dict | None} (actors.train_launcher)."""
    import datasets
    import ray

    from actors.cluster import local_dir
    from actors.train_loop import make_engine, run_steps
    from align.data.pairs import collate_packed_pairs, collate_pairs
    from align.engine.models import build_model_for, load_tokenizer

    warnings.filterwarnings("ignore", category=FutureWarning)  # torch.distributed renames, inside DeepSpeed
    rank, world, bf16, zero_stage = worker_setup(config)
    train = config["train"]
    objective: Objective = config["objective"]
    packed = train.prefix_sharing and objective.model_kind == "causal_lm"
    model_path = local_dir(config["model"])
    tokenizer = load_tokenizer(model_path)
    model = build_model_for(objective.model_kind, model_path, tokenizer, config.get("lora"))
    if train.disable_dropout:
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
    ref_model = None
    if objective.live_reference:
        ref_model = build_model_for(objective.model_kind, model_path, tokenizer, None).eval().requires_grad_(False)
    data = datasets.Dataset(datasets.table.InMemoryTable(ray.get(config["data"])))
    engine = make_engine(model, train, train.batch_size // world // train.micro_batches, bf16)
    if ref_model is not None:
        ref_model.to(device=engine.device, dtype=torch.bfloat16 if bf16 else torch.float32)
    eval_data = None
    if config.get("eval_data") is not None and train.eval_every:
        eval_data = datasets.Dataset(datasets.table.InMemoryTable(ray.get(config["eval_data"])))
    steps = PairObjectiveSteps(engine, objective, ref_model, data, eval_data, tokenizer,
                               collate_packed_pairs if packed else collate_pairs, train, rank, world, zero_stage)
    run_dir = run_steps(engine, steps, config, rank, world)
    upload_final_model(engine, zero_stage, rank, objective.model_kind, model_path, config, tokenizer, run_dir)


@torch.no_grad()
def validation_metrics(engine, ref_model, objective: Objective, data, ref_table, micro: int, rank: int, world: int,
                       pad_id: int, eos_id: int | None, collate) -> dict[str, float]:
    """The objective's loss and metrics on held-out pairs, as "val/<name>", averaged over the pairs.
    Every rank scores the same number of full micro-batches (ZeRO-3 gathers parameters inside each
    forward), so the first len(data) // (micro * world) * (micro * world) pairs are used."""
    usable = len(data) // (micro * world) * (micro * world)
    sums: dict[str, float] = {}
    was_training = engine.module.training
    engine.eval()
    for start in range(rank * micro, usable, micro * world):
        idx = torch.arange(start, start + micro)
        batch = collate([data[int(i)] for i in idx], pad_id)
        if ref_table is not None:
            batch["ref_chosen_logps"], batch["ref_rejected_logps"] = ref_table[idx, 0], ref_table[idx, 1]
        batch = {k: v.to(engine.device) for k, v in batch.items()}
        loss, metrics = objective.compute_loss(engine, ref_model, batch, eos_id)
        for k, v in {"loss": loss, **metrics}.items():
            sums[k] = sums.get(k, 0.0) + float(v)
    engine.module.train(was_training)
    batches = usable // (micro * world)
    means = mean_over_ranks({k: v / batches for k, v in sums.items()}, engine.device)
    return {f"val/{k}": v for k, v in means.items()}




