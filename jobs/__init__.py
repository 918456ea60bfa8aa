"""Entry points: `python -m jobs.NAME --config configs/NAME.yaml`; each exposes run(cfg) -> metrics."""
