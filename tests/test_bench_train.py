"""The training benchmark on a tiny grid: both project layouts timed on the same pairs (TRL needs its
own environment and is skipped here), the table written, a bad method named."""
import pytest

from align.runtime.config import ConfigError, load_config
from jobs.bench.train import BenchTrainConfig, make_pairs, run


def test_bench_train_quick(tmp_path):
    result = run(BenchTrainConfig(quick=True, output_dir=str(tmp_path / "b")))
    rows = {r["method"]: r for r in result["rows"]}
    assert list(rows) == ["two_sequences", "prefix_sharing"]  # trl skipped: no trl_python
    # The same pairs either way: 2 pairs x 2 sides x (4 prompt + 4 completion) real tokens a step.
    assert rows["two_sequences"]["tokens_per_step"] == rows["prefix_sharing"]["tokens_per_step"] == 32
    assert rows["two_sequences"]["steps"] == 2 and rows["two_sequences"]["vs_baseline"] == 1.0
    assert "prefix_sharing" in (tmp_path / "b" / "results.md").read_text()


def test_pairs_end_in_eos_and_bad_method():
    pairs = make_pairs(BenchTrainConfig(quick=True, pairs_per_step=2, steps=2, warmup_steps=1, prompt_len=4, completion_len=4))
    assert len(pairs) == 6 and all(p["chosen_ids"][-1] == 0 and len(p["rejected_ids"]) == 4 for p in pairs)
    with pytest.raises(ConfigError) as err:
        load_config(BenchTrainConfig, "configs/bench/train.yaml", ["methods=[trl, deepspeed]"])
    assert err.value.field == "methods"
