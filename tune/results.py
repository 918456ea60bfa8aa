"""What every sweep writes: a table sorted by the objective (printed, results.md, results.csv,
results.json) and a PNG of reward against KL with the Pareto front marked."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path


def plot_front(rows: list[dict], reward: str, label, path: Path, title: str) -> None:
    """Reward against KL for every trial; the Pareto front joined and marked; each point labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r.get("kl") is not None and r.get(reward) is not None]  # evaluated trials only
    fig, ax = plt.subplots(figsize=(7, 4.8))
    ax.errorbar([r["kl"] for r in rows], [r[reward] for r in rows], xerr=[r.get("kl_se", 0) for r in rows],
                yerr=[r.get(f"{reward}_se", 0) for r in rows], fmt="o", color="tab:gray", capsize=2, label="trial")
    front = sorted((r for r in rows if r["pareto"]), key=lambda r: r["kl"])
    ax.plot([r["kl"] for r in front], [r[reward] for r in front], "-o", color="tab:red", label="Pareto front")
    for r in rows:
        ax.annotate(label(r), (r["kl"], r[reward]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    import textwrap

    ax.set(xlabel="KL(pi || pi_0) (nats)", ylabel=f"mean {reward} reward")
    ax.set_title(textwrap.fill(title, 70), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_sweep(out: Path, rows: list[dict], columns: list[tuple[str, str, str]], objective: str, reward: str,
                label, title: str) -> str:
    """Sort `rows` (one per trial) by `objective`, mark the reward-KL Pareto front, write results.csv,
    results.md, results.json and pareto.png under `out`, and return the printed table."""
    from align.math.pareto import pareto_front
    from align.runtime.runstate import write_atomic
    from jobs.tables import format_table

    rows = sorted(rows, key=lambda r: -r[objective])
    scored = [r for r in rows if r.get("kl") is not None and r.get(reward) is not None]  # a trial stopped early has none
    for r in rows:
        r["pareto"] = False
    for r, on in zip(scored, pareto_front([r["kl"] for r in scored], [r[reward] for r in scored])):
        r["pareto"] = on
    keys = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, keys)
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(out / "results.csv", buf.getvalue())
    columns = [*columns, ("Pareto", "pareto", "{}")]
    text, md = format_table([{**r, "pareto": "*" if r["pareto"] else ""} for r in rows], columns)
    write_atomic(out / "results.md", f"# {title}\n\nSorted by {objective}; * marks the reward-KL Pareto front.\n\n{md}\n")
    write_atomic(out / "results.json", json.dumps({"objective": objective, "trials": rows}, indent=2))
    plot_front(rows, reward, label, out / "pareto.png", title)
    return text
