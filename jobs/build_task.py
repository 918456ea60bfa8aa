"""Build (or find) the embedded default task and print what pi_0 is: loss, fluency, size, place.

    python -m jobs.build_task --config configs/build_task.yaml              # one machine
    python -m jobs.build_task --config configs/build_task.yaml train_steps=600 cache_dir=/tmp/tasks

Other jobs build the task on first use anyway (model.path: default); this job does it up front, e.g.
once in CI or before a cluster run (then set SWEETSPOT_CACHE to a shared directory). A finished build
is reused: its directory is keyed by a hash of the config.
"""
from __future__ import annotations

import logging

from align.runtime.config import parse_args
from align.task.default_task import DefaultTaskConfig, config_hash, ensure_default_task


def run(cfg: DefaultTaskConfig) -> dict:
    """Ensure the task for `cfg` exists; returns its report (plus where it is and whether it was reused)."""
    task = ensure_default_task(cfg, progress=True)
    return {**task.report, "root": str(task.root), "policy_dir": str(task.policy_dir), "reused": task.reused}


def print_summary(r: dict) -> None:
    rows = [
        ("task", f"{r['root']} ({'reused' if r['reused'] else 'built now'}, config {r['config_hash']})"),
        ("held-out loss", f"{r['heldout_loss_per_token']:.3f} nats/token (uniform {r['uniform_loss_per_token']:.2f}; "
                          f"last train steps {r['train_loss_last_steps']:.3f})"),
        ("fluency pi_0 / random init", f"{r['fluency']:.3f} / {r['random_init_fluency']:.3f}"),
        ("parameters", f"{r['num_params']:,} (vocab {r['vocab_size']}, {r['corpus_words']} corpus words)"),
        ("build time", f"{r['build_seconds']:.1f} s on {r['threads']} threads "
                       + " ".join(f"{k}={v}" for k, v in r["timings_s"].items())),
        ("prompts", ", ".join(f"{k} {v}" for k, v in r["num_prompts"].items())),
        ("gold reward (VADER compound)", f"held-out reviews {r['heldout_compound']['mean']:+.3f} "
                                         f"({r['heldout_compound']['positive_share']:.0%} positive, "
                                         f"{r['heldout_compound']['negative_share']:.0%} negative); "
                                         f"pi_0 samples {r['pi0_compound_mean']:+.3f}"),
    ]
    width = max(len(a) for a, _ in rows)
    print("\n" + "\n".join(f"  {a:<{width}}  {b}" for a, b in rows))
    for ex in r["examples"][:3]:
        print(f"    {ex['prompt']!r} -> {ex['completion']!r}")


def main(argv=None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg = parse_args(DefaultTaskConfig, argv, description=__doc__.splitlines()[0])
    logging.getLogger(__name__).info("config %s: %s", config_hash(cfg), cfg)
    report = run(cfg)
    print_summary(report)
    return report


if __name__ == "__main__":
    main()
