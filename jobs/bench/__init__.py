"""Measurement programs: `python -m jobs.bench.NAME --config configs/bench/NAME.yaml`. Each prints a
table with ratios against its baseline measured in the same run. No entry point imports from here."""
