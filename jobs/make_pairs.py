"""Training pairs from best-of-n samples: for each split, run jobs.bon (n samples per prompt, gold
reward), then save two `datasets` DatasetDicts:

  <output_dir>/bonbon  best vs worst of each prompt's n samples (BoNBoN, DPO), with rewards and n
  <output_dir>/random  two random samples per pair, labelled by the reward (reward-model training)

    python -m jobs.make_pairs --config configs/make_pairs.yaml
    ray job submit --working-dir . -- python -m jobs.make_pairs --config configs/make_pairs.yaml
"""
from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path

from align.runtime.config import OutputPath, require, run_job
from jobs.bon import BonConfig

log = logging.getLogger("sweetspot.pairs")


@dataclass
class MakePairsConfig:
    bon: BonConfig = field(default_factory=BonConfig)  # sampling, reward, pool; prompts.split is set per split
    splits: list[str] = field(default_factory=lambda: ["train", "test"])
    random_pairs_per_prompt: int = 2
    output_dir: OutputPath = "outputs/pairs"
    replace: bool = False  # replace another config's pairs in output_dir (otherwise refused, naming the keys)

    def __post_init__(self):
        require(len(self.splits) > 0, "splits", "a non-empty list of prompt splits", self.splits)
        require(self.bon.sampling.n >= 2, "bon.sampling.n", "an integer >= 2 (pairs need two samples)", self.bon.sampling.n)
        require(self.bon.selection == "argmax", "bon.selection", "argmax (pairs need all n samples scored)", self.bon.selection)
        require(self.random_pairs_per_prompt >= 1, "random_pairs_per_prompt", "an integer >= 1", self.random_pairs_per_prompt)


def sample_split(cfg: MakePairsConfig, split: str, out: Path, resample: bool):
    """BoN samples for one prompt split -> (bon metrics, best/worst pairs, random pairs)."""
    import datasets

    from align.data.pairs import bon_pairs, random_pairs
    from jobs import bon

    log.info("sampling split %r", split)
    split_cfg = replace(cfg.bon, prompts=replace(cfg.bon.prompts, split=split), output_dir=str(out / f"samples_{split}"),
                        resume="never" if resample else cfg.bon.resume)
    metrics = bon.run(split_cfg)
    rows = [json.loads(line) for line in (out / f"samples_{split}" / "samples.jsonl").read_text().splitlines()]
    return (metrics, datasets.Dataset.from_dict(bon_pairs(rows)),
            datasets.Dataset.from_dict(random_pairs(rows, cfg.random_pairs_per_prompt, seed=cfg.bon.seed)))


def run(cfg: MakePairsConfig) -> dict:
    import datasets
    import ray

    from actors.cluster import init_ray
    import yaml

    from align.runtime.config import to_dict
    from align.runtime.runstate import claim_output, replace_dir, write_atomic

    out = Path(cfg.output_dir)
    changed = claim_output(out, to_dict(cfg), cfg.replace)
    resample = any(d.startswith("bon.") for d in changed)  # replacing: the samples only when their config changed
    best_worst, rand, metrics = {}, {}, {}
    started = init_ray(cfg.bon.ray_address)  # one Ray for all splits
    try:
        for split in cfg.splits:
            metrics[split], best_worst[split], rand[split] = sample_split(cfg, split, out, resample)
    finally:
        if started:
            ray.shutdown()
    for name, parts in (("bonbon", best_worst), ("random", rand)):
        tmp, target = out / f".{name}.tmp", out / name
        shutil.rmtree(tmp, ignore_errors=True)
        datasets.DatasetDict(parts).save_to_disk(str(tmp))
        replace_dir(tmp, target)
        print(f"  {target}: " + ", ".join(f"{s} {len(d)} pairs" for s, d in parts.items()))
    write_atomic(out / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return metrics


def main(argv=None) -> dict:
    return run_job(MakePairsConfig, run, argv, description=__doc__)


if __name__ == "__main__":
    main()
