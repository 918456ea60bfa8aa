"""jobs.report --quick: the whole study as one pipeline at toy size writes every section of the report
with its plots; a changed knob reruns exactly its stage and those that read it, and reuses the rest."""
import pytest

from jobs.report import main

pytestmark = [pytest.mark.ray, pytest.mark.slow]

SECTIONS = ["## 1. Best-of-n", "## 2. BoNBoN", "## 3. vBoN", "## 4. DeRa", "## 5. Two rewards", "## 6. Overoptimization"]


def statuses(result):
    return {r["stage"]: r["status"] for r in result["stages"]}


def test_report_quick_writes_every_section_and_reruns_only_what_changed(ray_session, small_task, tmp_path):
    args = ["--config", "configs/report.yaml", "--quick", f"vars.pi0={small_task.policy_dir}",
            f"vars.prompts={small_task.root / 'prompts'}", f"output_dir={tmp_path / 'out'}",
            f"report={tmp_path / 'REPORT.md'}", f"figures_dir={tmp_path / 'figures'}"]
    first = main(args)
    assert set(statuses(first).values()) == {"ran"} and len(first["stages"]) == 12
    text = (tmp_path / "REPORT.md").read_text()
    assert [s for s in SECTIONS if s in text] == SECTIONS
    body = text.split("## 1.")[1].split("## Stages")[0]
    assert body.count("**Claim.**") == 6 and body.count("**Verdict.**") == 6 and body.count("**Measured") == 6
    assert "Quick mode" in text and "nan" not in body
    for png in ("bon.png", "policies.png", "learning.png", "dera.png", "overopt.png"):
        assert (tmp_path / "figures" / png).read_bytes()[:4] == b"\x89PNG" and f"figures/{png}" in text
    assert "| BoN n=16 |" not in body and "| 16 |" in body  # the BoN table has a row per n of the decoders
    # Verdicts state their test: KL from samples beside the bound, vBoN's objective against pi_bon's,
    # paired per-prompt intervals and sign tests behind the LSC and remedy verdicts.
    assert "KL from samples" in body and "vbon ends at J = " in body and "against pi_bon's -0.297" in body
    assert body.count("exact sign test p = ") >= 2

    # DPO's beta feeds the evaluation, not DeRa (which reads dpo_beta02) nor the other trainers.
    plan = main([*args, "dry_run=true", "set.dpo=[dpo.beta=0.3]"])
    assert {k for k, v in statuses(plan).items() if v == "run"} == {"dpo", "evaluate"}
    # An evaluation knob: only the evaluation runs, in a directory of its own; every other stage is
    # reused, and the report is written again from them.
    changed = main([*args, "set.evaluate=[seed=1]"])
    assert {k for k, v in statuses(changed).items() if v == "ran"} == {"evaluate"}
    assert list(statuses(changed).values()).count("reused") == 11
    assert len(list((tmp_path / "out").glob("evaluate-*"))) == 2
    assert (tmp_path / "REPORT.md").read_text().count("**Verdict.**") == 6
