"""TRL's DPOTrainer on the pairs `jobs.bench.train` wrote, timed per step. It runs in an environment
with TRL installed (`make bench-env`), never in the project's own:

    .venv-bench/bin/python jobs/bench/train_trl.py SPEC.json OUT.json

Settings matched to the project's rows: fp32 (TRL defaults to bf16 autocast), no gradient
checkpointing (TRL's default is on), no gradient clipping, constant learning rate, reference log-probs
precomputed before training (untimed), sdpa attention. A step is timed from the end of the previous
one, so data loading and collation count, as they do in the project's rows.
"""
from __future__ import annotations

import json
import sys
import time


def main(spec_path: str, out_path: str) -> None:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    spec = json.loads(open(spec_path).read())
    torch.set_num_threads(spec["num_threads"])
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], attn_implementation="sdpa")
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    rows = spec["rows"]
    per_pair = [len(tokenizer(r["prompt"] + r["chosen"])["input_ids"]) + len(tokenizer(r["prompt"] + r["rejected"])["input_ids"])
                for r in rows[: spec["pairs_per_step"]]]
    total_steps = spec["warmup_steps"] + spec["steps"]
    args = DPOConfig(output_dir=spec["output_dir"], per_device_train_batch_size=spec["pairs_per_step"], max_steps=total_steps,
                     learning_rate=spec["lr"], beta=spec["beta"], bf16=False, fp16=False, gradient_checkpointing=False,
                     precompute_ref_log_probs=True, max_grad_norm=0.0, lr_scheduler_type="constant", warmup_steps=0,
                     logging_steps=10**6, save_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0,
                     seed=spec["seed"], max_length=None, optim="adamw_torch", disable_tqdm=True)

    ends: list[float] = []

    class StepTimer(TrainerCallback):
        def on_train_begin(self, *a, **k):
            ends.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            ends.append(time.perf_counter())

    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         callbacks=[StepTimer()])
    trainer.train()
    seconds = [b - a for a, b in zip(ends, ends[1:])][spec["warmup_steps"] :]
    with open(out_path, "w") as f:
        json.dump({"seconds": seconds, "tokens": [sum(per_pair)] * len(seconds)}, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
