"""What the three trainer jobs share: the pair-data section of their configs, turning a pair dataset
into the tokenized dataset the workers read (with frozen-reference log-probs computed once and stored),
and the end-of-run summary. Not an entry point."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from align.config import ConfigError, require

log = logging.getLogger("sweetspot.train")


@dataclass
class PairDataConfig:
    source: str = "outputs/pairs/bonbon"  # saved datasets dir (jobs.make_pairs) or .jsonl with prompt/chosen/rejected
    split: str = "train"  # used when the source holds several splits
    limit: int | None = None  # first `limit` pairs

    def __post_init__(self):
        require(self.limit is None or self.limit >= 1, "limit", "null or an integer >= 1", self.limit)


def load_pair_dataset(cfg: PairDataConfig):
    """A `datasets.Dataset` of pairs from a saved dataset dir or a JSON/JSONL file; columns checked."""
    import datasets

    from align.pairs import check_pair_columns

    path = Path(cfg.source)
    if not path.exists():
        raise ConfigError("data.source", "an existing pair dataset (run `python -m jobs.make_pairs` first, or give "
                          "a .jsonl / datasets directory with prompt, chosen, rejected columns)", cfg.source)
    if path.is_dir():
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if cfg.split not in ds:
                raise ValueError(f"data.split: {cfg.split!r} is not a split of {cfg.source} (splits: {list(ds)})")
            ds = ds[cfg.split]
    else:
        ds = datasets.load_dataset("json", data_files=str(path), split="train")
    check_pair_columns(ds.column_names, cfg.source)
    if cfg.limit is not None:
        ds = ds.select(range(min(cfg.limit, len(ds))))
    if len(ds) == 0:
        raise ValueError(f"data.source: {cfg.source} has no pairs")
    return ds


@torch.no_grad()
def add_reference_logps(ds, model_path: str, tokenizer, batch_size: int = 32):
    """Store log pi_ref(chosen|x) and log pi_ref(rejected|x) of the frozen reference with the data."""
    from actors.objectives import pair_logps
    from align.models import build_model_for
    from align.pairs import collate_pairs

    ref = build_model_for("causal_lm", model_path, tokenizer).eval()
    chosen, rejected = [], []
    for i in range(0, len(ds), batch_size):
        batch = collate_pairs([ds[j] for j in range(i, min(i + batch_size, len(ds)))], tokenizer.pad_token_id)
        c, r, _ = pair_logps(ref, batch)
        chosen += c.tolist()
        rejected += r.tolist()
    return ds.add_column("ref_chosen_logps", chosen).add_column("ref_rejected_logps", rejected)


def prepare_training_data(data: PairDataConfig, model_path: str, max_length: int, out_dir: Path,
                          with_reference_logps: bool) -> Path:
    """Tokenize the pairs (and add frozen-reference log-probs) once; saved under out_dir/data and
    reused when the run is resumed."""
    from align.models import load_tokenizer
    from align.pairs import tokenize_pair_batch

    target = out_dir / "data"
    if (target / "dataset_info.json").exists():
        log.info("reusing tokenized data in %s", target)
        return target
    tokenizer = load_tokenizer(model_path)
    ds = load_pair_dataset(data)
    ds = ds.map(lambda b: tokenize_pair_batch(tokenizer, b["prompt"], b["chosen"], b["rejected"], max_length),
                batched=True, desc="tokenizing pairs")
    if with_reference_logps:
        log.info("computing frozen-reference log-probs for %d pairs", len(ds))
        ds = add_reference_logps(ds, model_path, tokenizer)
    tmp = out_dir / ".data.tmp"
    ds.save_to_disk(str(tmp))
    tmp.rename(target)
    return target


def finish(name: str, metrics: dict, output_dir: Path, seconds: float) -> dict:
    """Print the run summary (with trainer throughput) and write metrics.json."""
    rows = [(k, metrics[k]) for k in sorted(metrics) if isinstance(metrics[k], (int, float))]
    print(f"\n  {name}: final metrics")
    for k, v in rows:
        print(f"    {k:<24} {v:.4g}")
    print(f"    {'wall seconds':<24} {seconds:.1f}")
    print(f"  trainer throughput: {metrics.get('tokens_per_s', float('nan')):.0f} tokens/s")
    print(f"  model saved to {output_dir / 'model'}")
    (output_dir / "metrics.json").write_text(json.dumps({**metrics, "wall_seconds": seconds}, indent=2))
    return metrics


def run_training(title: str, objective: str, params: dict, model: str, data: PairDataConfig, train,
                 output_dir: str, reference_logps: bool, lora: dict | None = None) -> dict:
    """Prepare the data, start (or join) Ray, run the worker group, print the summary."""
    import time

    import ray

    from actors.train_launcher import launch_training
    from align.models import resolve_model_path

    start = time.perf_counter()
    out = Path(output_dir)
    if not (out / "data" / "dataset_info.json").exists():
        load_pair_dataset(data)  # data errors stop here, before a model is built or Ray starts
    model_path = resolve_model_path(model)
    data_dir = prepare_training_data(data, model_path, train.max_length, out, with_reference_logps=reference_logps)
    started = not ray.is_initialized()
    if started:
        ray.init(include_dashboard=False, logging_level="ERROR")
    try:
        metrics = launch_training(objective, params, model_path, str(data_dir), train, out, lora=lora)
    finally:
        if started:
            ray.shutdown()
    return finish(title, metrics, out, time.perf_counter() - start)
