"""The reproduction report: the whole default-task study as one pipeline (jobs.pipeline), then
REPORT.md with its plots, each paper's claim stated next to what was measured, with error bars, and
whether the two agree.

    python -m jobs.report --config configs/report.yaml            # about 20 minutes on 2 cores
    python -m jobs.report --config configs/report.yaml --quick    # every section at toy size (CI)

Sections: best-of-n's closed forms against measured BoN; BoNBoN against BoN and DPO/IPO on the same
pairs; vBoN against KL-regularised RL; DeRa at lambda against DPO retrained at beta / lambda; the LSC
sum against the raw sum of two rewards; overoptimization remedies. The stages are reused when their
configs have not changed (jobs.pipeline), so editing the report's text or plots reruns nothing.
"""
from __future__ import annotations

import json
import math
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from align.runtime.config import require, run_job
from jobs.pipeline import PipelineConfig, StageSpec

# The stages each section reads (name -> job); a report config must have them.
NEEDED = {"pairs": "make_pairs", "bonbon": "train_bonbon", "dpo": "train_dpo", "ipo": "train_dpo", "dpo_beta02": "train_dpo",
          "dpo_beta04": "train_dpo", "dpo_beta005": "train_dpo", "vbon": "train_vbon", "kl_rl": "train_vbon",
          "evaluate": "evaluate", "dera": "dera", "overopt": "overopt"}


@dataclass
class ReportConfig(PipelineConfig):
    quick: dict[str, list[str]] = field(default_factory=dict)  # overrides per stage under --quick (toy size)
    quick_mode: bool = False  # set by --quick
    report: str = "docs/REPORT.md"
    figures_dir: str = "docs/report"

    def __post_init__(self):
        super().__post_init__()
        jobs = {s.name: s.job for s in self.stages}
        for name, job in NEEDED.items():
            require(jobs.get(name) == job, "stages", f"a stage named {name!r} running jobs.{job} (the report reads it)",
                    sorted(jobs))
        for name in self.quick:
            require(name in jobs, f"quick.{name}", "a stage name: " + ", ".join(jobs), name)

    def overrides_of(self, spec: StageSpec) -> list[str]:
        quick = self.quick.get(spec.name, []) if self.quick_mode else []
        return [*spec.overrides, *quick, *self.set.get(spec.name, [])]


def bon_curve_win_at(kl: float) -> float:
    """BoN's closed-form win rate n/(n+1) at the (continuous) n whose closed-form KL is `kl`."""
    lo, hi = 1.0, 1e6
    for _ in range(200):  # log n - (n - 1)/n is increasing in n
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if math.log(mid) - (mid - 1) / mid < kl else (lo, mid)
    return lo / (lo + 1)


def fmt_ci(ci) -> str:
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def verdict(ok: bool | str | None) -> str:
    """True / False / None, or "partly" when a claim has parts and only some hold."""
    return {True: "**agrees**", False: "**does not agree**", None: "**inconclusive**", "partly": "**agrees in part**"}[ok]


def parts(*oks: bool) -> bool | str:
    return True if all(oks) else False if not any(oks) else "partly"


def paired(a: dict | None, b: dict | None, key: str) -> dict | None:
    """align.math.stats.paired_verdict of two rows' per-prompt values (`key`), or None when either
    row, or its per-prompt values (results of an older run), is missing."""
    from align.math.stats import paired_verdict

    if not a or not b or key not in a or key not in b:
        return None
    return paired_verdict(a[key], b[key])


def describe_test(t: dict | None) -> str:
    """The rule and the numbers behind a paired verdict, for the report's text."""
    if t is None:
        return "no per-prompt values to test (rerun the stage)"
    return (f"mean paired difference {t['mean_diff']:+.3f}, 95% bootstrap interval over {t['prompts']} prompts "
            f"{fmt_ci(t['ci'])} (agrees only if it lies above 0), better on {t['a_better']} prompts and worse on "
            f"{t['b_better']} (exact sign test p = {t['sign_p']:.3g})")


def md_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    from jobs.tables import format_table

    return format_table(rows, columns)[1]


def section_bon(ev: dict, pairs: dict) -> tuple[str, list[dict]]:
    from align.math.bon import bon_kl_closed_form

    rows = []
    for r in ev["rows"]:
        if r.get("kind") == "bon":
            n = r["n"]
            se = r.get("kl_to_pi0_stderr") or 0.0
            rows.append({"n": n, "measured": r["win_rate_vs_pi0"], "ci": fmt_ci(r["win_rate_ci95"]), "ties": r["tie_rate"],
                         "closed": n / (n + 1), "kl": bon_kl_closed_form(n), "kl_est": r["kl_to_pi0"], "kl_se": se,
                         "inside": "yes" if r["win_rate_ci95"][0] <= n / (n + 1) <= r["win_rate_ci95"][1] else "no",
                         "under": r["kl_to_pi0"] - 2 * se <= bon_kl_closed_form(n)})
    inside = [r["inside"] == "yes" for r in rows]
    under = [r["under"] for r in rows]
    train = pairs.get("train", {})
    text = (f"**Claim.** Best-of-n beats one pi_0 sample with probability n / (n + 1) when the reward has no ties, and "
            f"KL(BoN || pi_0) is at most log n - (n - 1) / n (Beirami et al. 2024, arXiv:2401.01879; Gui et al. 2024, "
            f"arXiv:2406.00832).\n\n**Measured.** Best of n pi_0 samples by the gold reward, against one independent pi_0 "
            f"sample, on {ev['prompts']} test prompts x {ev['samples_per_prompt']} draws (95% bootstrap interval over prompts):"
            f"\n\n{md_table(rows, [('n', 'n', '{}'), ('measured win rate', 'measured', '{:.3f}'), ('95% CI', 'ci', '{}'), ('n/(n+1)', 'closed', '{:.3f}'), ('inside CI', 'inside', '{}'), ('ties', 'ties', '{:.3f}'), ('KL from samples', 'kl_est', '{:.3f}'), ('+-se', 'kl_se', '{:.3f}'), ('KL bound (nats)', 'kl', '{:.3f}')])}\n\n")
    if train:
        text += (f"The pair-building run measures the same at n = {train.get('n')} on {train.get('prompts')} training prompts: "
                 f"{train.get('win_rate_bon_vs_pi0', float('nan')):.3f} against {train.get('win_rate_closed_form', float('nan')):.3f} "
                 f"(ties {train.get('tie_rate', float('nan')):.3f}).\n\n")
    text += (f"**Verdict.** {verdict(all(inside) if rows else None)}: the closed form lies inside the interval for "
             f"{sum(inside)} of {len(rows)} n. KL from samples is the mean of log pi_bon/pi_0 = log n + (n - 1) log F_x(r) "
             f"(its reward-level form where rewards tie), F_x from the other candidates of the same prompt (independent "
             f"pi_0 draws); the closed form is its limit for continuous "
             f"rewards and an upper bound on a finite space (ties lower it further): the estimate is at most the bound "
             f"(within 2 se) for {sum(under)} of {len(rows)} n.\n")
    return text, rows


def section_bonbon(ev: dict) -> str:
    from align.math.bon import bon_kl_closed_form

    by = ev["by_name"]
    rows = [dict(by[k]) for k in ("bonbon", "dpo", "ipo", "BoN n=8") if k in by]
    for r in rows:
        r["ci"] = fmt_ci(r["win_rate_ci95"])
        r["kl_shown"] = r["kl_to_pi0"] if r.get("kl_to_pi0") is not None else bon_kl_closed_form(8)
    b, d, i, bon = (by.get(k) for k in ("bonbon", "dpo", "ipo", "BoN n=8"))
    ok, detail = None, ""
    if b and d and i and bon:
        near_bon = b["win_rate_ci95"][1] >= bon["win_rate_ci95"][0]  # the intervals overlap or BoNBoN is above
        less_drift = b["kl_to_pi0"] < min(d["kl_to_pi0"], i["kl_to_pi0"])
        ok = parts(near_bon, less_drift)
        detail = (f"BoNBoN's win-rate interval {fmt_ci(b['win_rate_ci95'])} {'overlaps' if near_bon else 'lies below'} "
                  f"BoN n=8's {fmt_ci(bon['win_rate_ci95'])}, and its KL {b['kl_to_pi0']:.2f} is "
                  f"{'below' if less_drift else 'not below'} DPO's {d['kl_to_pi0']:.2f} and IPO's {i['kl_to_pi0']:.2f}. "
                  f"BoN's own KL bound at n = 8 is {bon_kl_closed_form(8):.2f}.")
    table = md_table(rows, [("policy", "name", "{}"), ("gold win rate", "win_rate_vs_pi0", "{:.3f}"), ("95% CI", "ci", "{}"),
                            ("mean gold", "mean_reward_policy", "{:+.3f}"), ("words", "mean_words", "{:.1f}"),
                            ("KL (nats)", "kl_shown", "{:.2f}"),
                            ("+-se", "kl_to_pi0_stderr", "{:.2f}")])
    return (f"**Claim.** Fine-tuning on best-of-n samples with BoNBoN (SFT on the best plus IPO on best vs worst at "
            f"beta*_n) gives a policy close to best-of-n's win rate, with less drift from pi_0 than DPO or IPO trained on "
            f"the same best/worst pairs (Gui et al. 2024, arXiv:2406.00832).\n\n**Measured** (the same test prompts and pi_0 "
            f"samples for every row; BoN n=8's KL is estimated from its candidates, log n + (n - 1) log F_x(r); "
            f"words: the outputs' mean length, an off-target measure, against pi_0's "
            f"{(b or bon or {}).get('mean_words_pi0', float('nan')):.1f}):\n\n{table}\n\n**Verdict.** {verdict(ok)}: "
            f"{detail}\n")


TRAINED = ("bonbon", "dpo", "ipo", "dpo_beta02", "dpo_beta04", "dpo_beta005", "vbon", "kl_rl")


def vbon_objective_rows(history: list[dict], n: int) -> list[tuple[int, float]]:
    """(step, J) from a vBoN-loop run's logged rows: J = E[log F] - KL / (n - 1), the objective vBoN
    maximises (kl_rl logs the same two terms, so it is scored on the same scale)."""
    return [(r["step"], r["log_f"] - r["kl"] / (n - 1)) for r in history if "log_f" in r and "kl" in r]


def section_vbon(ev: dict, histories: dict[str, list[dict]] | None = None, n: int = 8) -> str:
    from align.math.vbon import vbon_objective_at_bon

    by = ev["by_name"]
    rows = [dict(by[k]) for k in ("vbon", "kl_rl") if k in by]
    for r in rows:
        r["ci"] = fmt_ci(r["win_rate_ci95"])
        r["bon_at_kl"] = bon_curve_win_at(max(r["kl_to_pi0"], 0.0))
        r["gap"] = r["win_rate_vs_pi0"] - r["bon_at_kl"]
    v = next((r for r in rows if r["name"] == "vbon"), None)
    ok, where = None, "no vBoN row"
    if v is not None:
        ok = v["win_rate_ci95"][0] <= v["bon_at_kl"] <= v["win_rate_ci95"][1] or v["gap"] > 0
        where = (f"BoN's win rate at vBoN's KL, {v['bon_at_kl']:.3f}, is "
                 + ("inside vBoN's interval" if v["win_rate_ci95"][0] <= v["bon_at_kl"] <= v["win_rate_ci95"][1] else
                    "below vBoN's interval" if v["gap"] > 0 else f"above vBoN's interval {fmt_ci(v['win_rate_ci95'])}"))
    table = md_table(rows, [("policy", "name", "{}"), ("gold win rate", "win_rate_vs_pi0", "{:.3f}"), ("95% CI", "ci", "{}"),
                            ("KL (nats)", "kl_to_pi0", "{:.2f}"), ("+-se", "kl_to_pi0_stderr", "{:.2f}"),
                            ("BoN at that KL", "bon_at_kl", "{:.3f}"), ("gap", "gap", "{:+.3f}")])
    return (f"**Claim.** Variational BoN (reverse KL to the BoN distribution, i.e. RL on log F_x(r) with KL weight "
            f"1/(n-1)) lands near best-of-n's reward-KL curve, where KL-regularised RL on the raw reward is a point "
            f"on a different trade-off (Amini et al. 2024, arXiv:2407.06057).\n\n**Measured** (\"BoN at that KL\": the "
            f"closed-form win rate n/(n+1) at the n whose KL bound equals the policy's KL):\n\n{table}\n\n"
            f"{objective_text(histories or {}, n, vbon_objective_at_bon(n))}"
            f"**Verdict.** {verdict(ok)}: {where}.\n")


def objective_text(histories: dict[str, list[dict]], n: int, at_bon: float) -> str:
    """Where each vBoN-loop run's objective ended against pi_bon's value (its maximum)."""
    ends = {k: vbon_objective_rows(histories.get(k, []), n) for k in ("vbon", "kl_rl")}
    parts_ = [f"{k} ends at J = {rows[-1][1]:.3f} (step {rows[-1][0]})" for k, rows in ends.items() if rows]
    if not parts_:
        return ""
    return (f"vBoN's objective J = E[log F_x(r)] - KL / (n - 1) on its training prompts (learning curves below): "
            f"{'; '.join(parts_)}, against pi_bon's {at_bon:.3f} = -log(n)/(n - 1) at n = {n}, which no policy exceeds; "
            f"the gap is how far from converged a run stopped.\n\n")


def section_dera(ev: dict, dera: dict, base_beta: float, retrained: dict[float, str]) -> tuple[str, list[dict]]:
    by = ev["by_name"]
    curve = {m["lambda"]: m for m in dera["lambdas"]}
    rows = []
    for lam, name in sorted(retrained.items()):
        r, c = by.get(name), curve.get(lam)
        if r is None or c is None:
            continue
        se = c["gold_se"] * math.sqrt(2)  # the difference of two estimates of about the same spread
        kl_se = math.hypot(c["kl_se"], r.get("kl_to_pi0_stderr") or 0.0)
        rows.append({"lambda": lam, "beta": base_beta / lam, "name": name, "dera_gold": c["gold"], "dera_kl": c["kl"],
                     "retrained_gold": r["mean_reward_policy"], "retrained_kl": r["kl_to_pi0"],
                     "gold_gap": r["mean_reward_policy"] - c["gold"], "gold_2se": 2 * se,
                     "kl_gap": r["kl_to_pi0"] - c["kl"], "kl_2se": 2 * kl_se,
                     "close_gold": abs(r["mean_reward_policy"] - c["gold"]) <= 2 * se,
                     "close_kl": abs(r["kl_to_pi0"] - c["kl"]) <= 2 * kl_se, "check": lam == 1.0})
    table = md_table(rows, [("lambda", "lambda", "{:g}"), ("retrained at beta", "beta", "{:g}"),
                            ("DeRa gold", "dera_gold", "{:+.3f}"), ("retrained gold", "retrained_gold", "{:+.3f}"),
                            ("gap", "gold_gap", "{:+.3f}"), ("2 se", "gold_2se", "{:.3f}"),
                            ("DeRa KL", "dera_kl", "{:.2f}"), ("retrained KL", "retrained_kl", "{:.2f}"),
                            ("gap", "kl_gap", "{:+.2f}"), ("2 se", "kl_2se", "{:.2f}")])
    tested = [r for r in rows if not r["check"]]
    gold_ok, kl_ok = sum(r["close_gold"] for r in tested), sum(r["close_kl"] for r in tested)
    ok = None if not tested else parts(gold_ok == len(tested), kl_ok == len(tested))
    text = (f"**Claim.** Sampling from softmax(lambda * aligned + (1 - lambda) * reference logits), with the aligned model "
            f"trained at beta, approximates the model trained at beta / lambda, so the strength can be chosen without "
            f"retraining (Liu et al. 2024, arXiv:2402.02992).\n\n**Measured.** DeRa over pi_0 and DPO at beta = {base_beta:g} "
            f"on the test prompts at every lambda (the curve), and DPO retrained at beta / lambda for "
            f"{sum(not r['check'] for r in rows)} lambdas "
            f"(the points), same pairs, steps and seed. Lambda 1 is the aligned model itself, sampled both ways: a check "
            f"of the two evaluations, not of DeRa.\n\n{table}\n\n**Verdict.** {verdict(ok)}: of {len(tested)} retrained "
            f"models, {gold_ok} sit within two standard errors of DeRa's gold reward at the matching lambda, and {kl_ok} "
            f"within two standard errors of its KL. The equivalence holds between optima of the KL-regularised "
            f"objective; trainers stopped after a fixed number of steps from pi_0 need not be at theirs, which is one "
            f"reason a retrained model can sit off the curve.\n")
    return text, rows


def section_lsc(ov: dict) -> str:
    rows = ov["two_reward"]
    top = max(r["n"] for r in rows)
    at = {r["combination"]: r for r in rows if r["n"] == top}
    lsc, raw = at.get("sum_of_lsc"), at.get("sum_raw")
    test = paired(lsc, raw, "per_prompt")
    ok = None if test is None else test["verdict"]
    shown = [r for r in rows if r["combination"] in ("sum_raw", "sum_of_lsc")]
    table = md_table(shown, [("combination", "combination", "{}"), ("n", "n", "{}"), ("good on both", "good_on_both", "{:.3f}"),
                             ("worst prompts", "worst_prompts", "{:.3f}"), ("gold", "gold", "{:+.3f}"), ("words", "words", "{:.1f}")])
    return (f"**Claim.** Summing log sigmoid(r_i - r_ref,i(x)) over rewards (the LSC transform) rewards being good on "
            f"every property at once, where the raw sum lets one reward buy off another (Wang et al. 2024, "
            f"arXiv:2402.00742).\n\n**Measured.** Best-of-n by a proxy sentiment reward plus a brevity reward, combined "
            f"each way; \"good on both\" is gold sentiment > 0 and at most the word budget:\n\n{table}\n\n"
            f"**Verdict.** {verdict(ok)} at n = {top}: the LSC sum's share good on both "
            f"{lsc['good_on_both'] if lsc else float('nan'):.3f} against the raw sum's "
            f"{raw['good_on_both'] if raw else float('nan'):.3f}; {describe_test(test)}.\n")


def section_overopt(ov: dict) -> str:
    rows = ov["curves"]
    summary = []
    for name in dict.fromkeys(r["remedy"] for r in rows):
        rs = sorted((r for r in rows if r["remedy"] == name), key=lambda r: r["n"])
        peak = max(rs, key=lambda r: r["gold"])
        summary.append({"remedy": name, "n1": rs[0]["gold"], "peak": peak["gold"], "peak_n": peak["n"], "last": rs[-1]["gold"],
                        "last_se": rs[-1]["gold_se"], "drop": peak["gold"] - rs[-1]["gold"]})
    top = max(r["n"] for r in rows)
    proxy = next((s for s in summary if s["remedy"] == "proxy"), None)
    last = {r["remedy"]: r for r in rows if r["n"] == top}
    remedies = [s for s in summary if s["remedy"] not in ("proxy", "gold (oracle)")]
    tests = {s["remedy"]: paired(last.get(s["remedy"]), last.get("proxy"), "gold_per_prompt") for s in remedies}
    better = [s for s in remedies if (tests[s["remedy"]] or {}).get("verdict") is True]
    overopt = proxy is not None and proxy["drop"] > 2 * proxy["last_se"]
    ok = None if proxy is None else parts(overopt, len(better) > len(remedies) / 2)
    table = md_table(summary, [("ranking", "remedy", "{}"), ("gold n=1", "n1", "{:+.3f}"), ("peak gold", "peak", "{:+.3f}"),
                               ("at n", "peak_n", "{}"), (f"gold n={top}", "last", "{:+.3f}"), ("+-se", "last_se", "{:.3f}"),
                               ("drop from peak", "drop", "{:.3f}")])
    agreement = ", ".join(f"{a:.3f}" for a in ov.get("proxy_heldout_agreement", []) if a is not None)
    return (f"**Claim.** Best-of-n against an imperfect proxy reward overoptimizes: the gold reward rises with n, then "
            f"stalls or falls (Gao et al. 2023, arXiv:2210.10760). Ensembles (Coste et al. 2024, arXiv:2310.02743), a "
            f"Laplace posterior over the reward model (Yang et al. 2024, arXiv:2402.13210) and regularized BoN (Jinnai "
            f"et al. 2024, arXiv:2404.01054) hold the gold reward up at large n.\n\n**Measured** ({ov['prompts']} test "
            f"prompts x {ov['samples_per_prompt']} samples; proxy held-out agreement {agreement}):\n\n{table}\n\n"
            f"**Verdict.** {verdict(ok)}: the plain proxy's gold reward "
            f"{'falls' if overopt else 'does not fall'} by more than two standard errors from its peak by n = {top}, and "
            f"{len(better)} of {len(remedies)} remedies end above it at n = {top}, paired on the same prompts: "
            + "; ".join(f"{name} {describe_test(t)}" for name, t in tests.items()) + ".\n")


def plot_bon(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ns = [r["n"] for r in rows]
    grid = [1 + k * 0.25 for k in range(int((max(ns, default=2) - 1) / 0.25) + 1)]
    ax.plot(grid, [n / (n + 1) for n in grid], color="tab:gray", label="n / (n + 1)")
    lows = [float(r["ci"].strip("[]").split(",")[0]) for r in rows]
    highs = [float(r["ci"].strip("[]").split(",")[1]) for r in rows]
    ax.errorbar(ns, [r["measured"] for r in rows], yerr=[[m - lo for m, lo in zip((r["measured"] for r in rows), lows)],
                                                         [hi - m for m, hi in zip((r["measured"] for r in rows), highs)]],
                fmt="o", capsize=3, label="measured (95% CI)")
    ax.set(xscale="log", xlabel="n", ylabel="win rate over pi_0", title="Best-of-n: closed form vs measured")
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.minorticks_off()
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_policies(ev: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from align.math.bon import bon_kl_closed_form

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ns = [2, 4, 8, 16, 32, 64, 128, 256]
    ax.plot([bon_kl_closed_form(n) for n in ns], [n / (n + 1) for n in ns], "-", color="tab:gray", label="best-of-n (closed form)")
    bon = [r for r in ev["rows"] if r.get("kind") == "bon"]
    if bon:
        ax.errorbar([r["kl_to_pi0"] for r in bon], [r["win_rate_vs_pi0"] for r in bon],
                    xerr=[r.get("kl_to_pi0_stderr") or 0 for r in bon],
                    yerr=[[r["win_rate_vs_pi0"] - r["win_rate_ci95"][0] for r in bon],
                          [r["win_rate_ci95"][1] - r["win_rate_vs_pi0"] for r in bon]],
                    fmt="D", color="tab:gray", capsize=2, label="best-of-n measured (KL from samples)")
    for r in ev["rows"]:
        if r.get("kind") is not None or r.get("kl_to_pi0") is None or r["name"].startswith("dpo_beta"):
            continue
        lo, hi = r["win_rate_ci95"]
        ax.errorbar(r["kl_to_pi0"], r["win_rate_vs_pi0"], xerr=r.get("kl_to_pi0_stderr") or 0,
                    yerr=[[r["win_rate_vs_pi0"] - lo], [hi - r["win_rate_vs_pi0"]]], fmt="s", capsize=3, label=r["name"])
    ax.set(xlabel="KL(pi || pi_0) (nats)", ylabel="gold win rate over pi_0", title="Policies against best-of-n")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_learning_curves(histories: dict[str, list[dict]], n: int, path: Path) -> None:
    """Every trained policy's loss against step, and the vBoN loop's objective J beside pi_bon's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from align.math.vbon import vbon_objective_at_bon

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, rows in histories.items():
        if rows and name not in ("vbon", "kl_rl"):
            left.plot([r["step"] for r in rows], [r["loss"] for r in rows], marker="o", ms=2, label=name)
            if any("val/loss" in r for r in rows):
                val = [r for r in rows if "val/loss" in r]
                left.plot([r["step"] for r in val], [r["val/loss"] for r in val], ls="--", label=f"{name} (held out)")
        elif rows:
            j = vbon_objective_rows(rows, n)
            right.plot([s for s, _ in j], [v for _, v in j], marker="o", ms=2, label=name)
    right.axhline(vbon_objective_at_bon(n), color="tab:gray", ls=":", label=f"pi_bon (n={n}): -log n/(n-1)")
    left.set(xlabel="step", ylabel="training loss", title="Offline objectives")
    right.set(xlabel="step", ylabel="E[log F] - KL/(n-1)", title="vBoN's objective")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_dera(dera: dict, rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    ms = dera["lambdas"]
    ax.errorbar([m["kl"] for m in ms], [m["gold"] for m in ms], yerr=[m["gold_se"] for m in ms], marker="o", capsize=2,
                label="DeRa (one aligned model, labels: lambda)")
    for m in ms:
        ax.annotate(f"{m['lambda']:g}", (m["kl"], m["gold"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    for r in rows:
        ax.plot(r["retrained_kl"], r["retrained_gold"], "s", ms=8, label=f"DPO retrained at beta {r['beta']:g} (lambda {r['lambda']:g})")
    ax.set_xscale("symlog", linthresh=1)  # extrapolated lambdas reach KLs far beyond the rest
    ax.set(xlabel="KL(pi || pi_0) (nats, log scale above 1)", ylabel="mean gold reward", title="DeRa vs retrained")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def environment() -> str:
    import os

    import ray
    import torch

    try:
        commit = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                                check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores"
    return (f"commit {commit}; {device}; Python {platform.python_version()}, torch {torch.__version__}, "
            f"Ray {ray.__version__}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")


def load_evaluation(d: Path) -> dict:
    """The evaluate stage's rows (policies, then decoders) by name, with its prompt and sample counts."""
    data = json.loads((d / "comparison.json").read_text())
    rows = data["policies"] + data.get("decoders", [])
    n = json.loads((d / "stage.json").read_text())["config"]["sampling"]["n"]
    return {"rows": rows, "by_name": {r["name"]: r for r in rows}, "prompts": rows[0]["samples"] // n, "samples_per_prompt": n}


def run(cfg: ReportConfig) -> dict:
    from jobs import pipeline

    t0 = time.perf_counter()
    result = pipeline.run(cfg)
    if cfg.dry_run or cfg.stop_after is not None:
        if cfg.stop_after is not None:
            print(f"\n  stopped after stage {cfg.stop_after!r}: the report needs every stage, none written", flush=True)
        return result
    report = write_report(cfg, result, t0)
    return {"report": str(report), "stages": result["stages"]}


def write_report(cfg: ReportConfig, result: dict, t0: float) -> Path:
    """REPORT.md and its plots from the finished stages (pipeline.run's result)."""
    import os
    import shutil

    from align.runtime.runstate import write_atomic

    stages = {r["stage"]: r for r in result["stages"]}
    dirs = {k: Path(r["dir"]) for k, r in stages.items()}
    ev = load_evaluation(dirs["evaluate"])
    dera = json.loads((dirs["dera"] / "results.json").read_text())
    ov = json.loads((dirs["overopt"] / "results.json").read_text())
    betas = {k: json.loads((dirs[k] / "stage.json").read_text())["config"]["dpo"]["beta"]
             for k in ("dpo", "dpo_beta02", "dpo_beta04", "dpo_beta005")}
    base = betas["dpo_beta02"]
    retrained = {round(base / betas[k], 6): k for k in ("dpo_beta04", "dpo", "dpo_beta005")}
    retrained[1.0] = "dpo_beta02"

    figs = Path(cfg.figures_dir)
    figs.mkdir(parents=True, exist_ok=True)
    report = Path(cfg.report)
    bon_text, bon_rows = section_bon(ev, stages["pairs"]["metrics"])
    dera_text, dera_rows = section_dera(ev, dera, base, retrained)
    plot_bon(bon_rows, figs / "bon.png")
    plot_policies(ev, figs / "policies.png")
    plot_dera(dera, dera_rows, figs / "dera.png")
    from actors.train_launcher import read_history

    histories = {k: read_history(dirs[k]) for k in TRAINED}
    vbon_n = json.loads((dirs["vbon"] / "stage.json").read_text())["config"]["vbon"]["n"]
    plot_learning_curves(histories, vbon_n, figs / "learning.png")
    shutil.copyfile(dirs["overopt"] / "overopt.png", figs / "overopt.png")

    def img(name: str, alt: str) -> str:
        return f"![{alt}]({os.path.relpath(figs / name, report.parent)})"

    wall = sum(r.get("wall_s") or 0 for r in result["stages"])
    stage_rows = [{"stage": r["stage"], "job": r["job"], "wall": r.get("wall_s"), "status": r["status"]} for r in result["stages"]]
    quick = ("\n> **Quick mode (`--quick`)**: every stage at toy size, to check that the report builds. The numbers "
             "below are not measurements of anything.\n" if cfg.quick_mode else "")
    body = f"""# Sweetspot reproduction report
{quick}
Written by `python -m jobs.report --config configs/report.yaml{' --quick' if cfg.quick_mode else ''}` ({environment()}).
The default task: pi_0 is the embedded 4-layer GPT-2 on generated movie-review sentences, the gold reward is
VADER's compound sentiment of the completion. Every number below comes from the stages listed at the end
(each a job with its own config, kept under `{cfg.output_dir}`); the stages took {wall / 60:.1f} minutes in
all when they ran.

## 1. Best-of-n: closed forms against measured

{bon_text}
{img('bon.png', 'win rate of best-of-n against n: closed form and measured')}

## 2. BoNBoN against best-of-n and DPO / IPO

{section_bonbon(ev)}
{img('policies.png', 'gold win rate against KL for every trained policy, with the best-of-n curve')}

## 3. vBoN against KL-regularised RL

{section_vbon(ev, histories, vbon_n)}
{img('learning.png', 'training loss against step for every trained policy, and the vBoN objective beside its maximum')}

## 4. DeRa against retraining

{dera_text}
{img('dera.png', 'DeRa gold reward against KL over lambda, with DPO retrained at beta / lambda')}

## 5. Two rewards: LSC sum against the raw sum

{section_lsc(ov)}
## 6. Overoptimization and its remedies

{section_overopt(ov)}
{img('overopt.png', 'gold reward against n for every remedy; the two-reward comparison')}

## Stages

{md_table(stage_rows, [('stage', 'stage', '{}'), ('job', 'job', '{}'), ('status', 'status', '{}'), ('wall (s)', 'wall', '{:.1f}')])}

Report written in {time.perf_counter() - t0:.0f} s of wall time this run ("reused" stages had finished
before, under the same config, and were read back).
"""
    write_atomic(report, body)
    print(f"\n  wrote {report} and its plots in {figs}/", flush=True)
    return report


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--quick" in argv:
        argv = [a for a in argv if a != "--quick"] + ["quick_mode=true"]
    return run_job(ReportConfig, run, argv, description=__doc__)


if __name__ == "__main__":
    main()
