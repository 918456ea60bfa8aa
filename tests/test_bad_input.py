"""Bad input to configs, command-line overrides, prompt files and pair files: each case stops before
any work with an error that names the field (or file and line) and what is allowed, and writes nothing.
The HTTP cases are in tests/test_serve.py (4xx naming the field, never a 5xx, fuzzed from the schema).

    python tests/test_bad_input.py     # prints the README's table: input -> the error it gets
"""
import sys
from pathlib import Path

import pytest

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

from align.runtime.config import ConfigError, load_config  # noqa: E402


def bon(tmp, *overrides, config="configs/bon.yaml"):
    """jobs.bon as the command line runs it: the config loaded, then run (errors come before work)."""
    from jobs.bon import BonConfig, run

    return run(load_config(BonConfig, config, [f"output_dir={tmp / 'out'}", "prompts.limit=2", *overrides]))


def write(tmp, name, data):
    path = tmp / name
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


def prompts_from(tmp, name, data, *extra):
    return bon(tmp, f"prompts.source={write(tmp, name, data)}", *extra)


def dpo(tmp, pairs, *extra):
    from jobs.train_dpo import DpoJobConfig, run

    return run(load_config(DpoJobConfig, "configs/train_dpo.yaml", [f"data.source={pairs}", f"output_dir={tmp / 'out'}",
                                                                    f"train.run.storage_path={tmp / 'runs'}", *extra]))


def pairs_from(tmp, data, *extra):
    return dpo(tmp, write(tmp, "pairs.jsonl", data), *extra)


def yaml_file(tmp, text):
    return bon(tmp, config=str(write(tmp, "job.yaml", text)))


def pipeline(tmp, *overrides):
    from jobs.pipeline import PipelineConfig, run

    return run(load_config(PipelineConfig, "configs/pipeline.yaml", [f"output_dir={tmp / 'out'}", *overrides]))


PAIR = '{"prompt": "the movie", "chosen": " was great", "rejected": " was bad"}\n'
# (area, the input, what to do with it, a piece of the message it must get)
CASES = [
    ("config", "`--config` names a file that does not exist", lambda t, m: bon(t, config="configs/nope.yaml"),
     "config field '--config': expected an existing YAML file, got 'configs/nope.yaml'"),
    ("config", "YAML with an unclosed `{`", lambda t, m: yaml_file(t, "sampling: {n: 8\nseed: 1\n"),
     "expected valid YAML"),
    ("config", "a YAML file that is not UTF-8", lambda t, m: bon(t, config=str(write(t, "job.yaml", b"seed: 1\n\xff\n"))),
     "expected a UTF-8 text file"),
    ("config", "a YAML list at the top level", lambda t, m: yaml_file(t, "- a\n- b\n"), "expected a YAML mapping at the top level"),
    ("config", "an unknown key `sampling.nn: 3`", lambda t, m: yaml_file(t, "sampling: {nn: 3}\n"),
     "config field 'sampling.nn': expected one of the known keys"),
    ("config", "`sampling.n: eight`", lambda t, m: yaml_file(t, "sampling: {n: eight}\n"),
     "config field 'sampling.n': expected an integer, got 'eight'"),
    ("config", "`sampling.n: 0`", lambda t, m: yaml_file(t, "sampling: {n: 0}\n"), "config field 'sampling.n': expected an integer >= 1"),
    ("config", "`sampling.temperature: -1`", lambda t, m: yaml_file(t, "sampling: {temperature: -1}\n"),
     "config field 'sampling.temperature': expected a number > 0"),
    ("config", "`sampling.min_new_tokens` above `max_new_tokens`", lambda t, m: bon(t, "sampling.min_new_tokens=30"),
     "config field 'sampling.min_new_tokens': expected 0 <= min_new_tokens <= max_new_tokens (24), got 30"),
    ("config", "`selection: best`", lambda t, m: bon(t, "selection=best"), "config field 'selection': expected one of 'argmax'"),
    ("config", "a training batch that does not split over the workers", lambda t, m: dpo(t, "x.jsonl", "train.batch_size=3"),
     "config field 'train.batch_size': expected a multiple of workers.num_workers (2), got 3"),
    ("config", "a DeRa `aligned` model directory that does not exist",
     lambda t, m: __import__("jobs.dera", fromlist=["run"]).run(load_config(
         __import__("jobs.dera", fromlist=["DeraConfig"]).DeraConfig, "configs/dera.yaml", [f"aligned={t / 'nowhere'}"])),
     "config field 'aligned': expected 'default', an HF model name or a directory with config.json"),
    ("config", "a classifier reward directory that does not exist", lambda t, m: bon(t, "reward.kind=classifier", f"reward.path={t / 'rm'}"),
     "config field 'reward.path': expected an HF model name or a directory with config.json, got \"{t}/rm ('{t}/rm' does not exist)\""),
    ("config", "a trainer's model directory without config.json", lambda t, m: dpo(t, "x.jsonl", f"model={t}"),
     "config field 'model': expected 'default', 'smollm2', an HF model name or a directory with config.json"),
    ("config", "a judge of a kind that does not exist", lambda t, m: bon(t, "judge.kind=bleu"), "config field 'judge.kind'"),
    ("config", "gradient accumulation in vBoN's on-policy loop", lambda t, m: load_config(
        __import__("jobs.train_vbon", fromlist=["VbonJobConfig"]).VbonJobConfig, "configs/train_vbon.yaml", ["train.micro_batches=2"]),
     "config field 'train.micro_batches': expected 1 (each step draws and scores its batch on the generators at once"),
    ("override", "`sampling.n` with no `=value`", lambda t, m: bon(t, "sampling.n"),
     "config field 'sampling.n': expected an override of the form key.sub=value"),
    ("override", "`prompts.source=[unclosed`", lambda t, m: bon(t, "prompts.source=[unclosed"),
     "config field 'prompts.source': expected a YAML value (quote strings holding {} [] : or #"),
    ("override", "`sampling.n.x=1` (n is not a mapping)", lambda t, m: bon(t, "sampling.n.x=1"),
     "config field 'sampling.n.x': expected 'n' to be a mapping"),
    ("override", "`sampling.n=2.5`", lambda t, m: bon(t, "sampling.n=2.5"), "config field 'sampling.n': expected an integer, got 2.5"),
    ("prompts", "a prompt file that does not exist", lambda t, m: bon(t, f"prompts.source={t / 'none.jsonl'}"),
     "prompts.source: {t}/none.jsonl does not exist"),
    ("prompts", "an empty .txt file", lambda t, m: prompts_from(t, "p.txt", ""), "config field 'prompts.source': expected a non-empty prompt set, got '{t}/p.txt (no non-blank line)'"),
    ("prompts", "only blank lines", lambda t, m: prompts_from(t, "p.txt", "\n  \n\n"), "expected a non-empty prompt set"),
    ("prompts", ".jsonl rows without the `prompt` column", lambda t, m: prompts_from(t, "p.jsonl", '{"text": "a"}\n'),
     "prompts.column: 'prompt' is missing in line 1 of"),
    ("prompts", "a .jsonl line that is not JSON", lambda t, m: prompts_from(t, "p.jsonl", '{"prompt": "a"}\n{prompt: b}\n'),
     "prompts.source: line 2 of {t}/p.jsonl is not JSON"),
    ("prompts", "a .jsonl line holding a list", lambda t, m: prompts_from(t, "p.jsonl", '["a", "b"]\n'),
     "prompts.source: line 1 of {t}/p.jsonl is a JSON list, not an object"),
    ("prompts", "a prompt that is a number", lambda t, m: prompts_from(t, "p.jsonl", '{"prompt": 7}\n'),
     "prompts.column: line 1 of {t}/p.jsonl: 'prompt' must be a non-empty string or a list of {role, content} messages, got 7"),
    ("prompts", "a prompt that is null", lambda t, m: prompts_from(t, "p.jsonl", '{"prompt": null}\n'),
     "'prompt' must be a non-empty string or a list of {role, content} messages, got None"),
    ("prompts", "a .txt line that is not UTF-8", lambda t, m: prompts_from(t, "p.txt", b"fine\n\xc3\x28 broken\n"),
     "prompts.source: line 2 of {t}/p.txt is not UTF-8 (byte 0)"),
    ("prompts", "a 2,000,000-character line", lambda t, m: prompts_from(t, "p.txt", "a" * 2_000_000 + "\n"),
     "prompts.source: line 1 of {t}/p.txt has 2000000 characters (at most 1000000)"),
    ("prompts", "a prompt longer than the model's context", lambda t, m: prompts_from(t, "p.txt", "the movie " * 200 + "\n", f"model.path={m}"),
     "prompts.source: prompt 0 ('the movie the movie the movie the movie '...) has"),
    ("prompts", "a .csv without the column", lambda t, m: prompts_from(t, "p.csv", "text\nhello\n"),
     "prompts.column: 'prompt' is not a column of {t}/p.csv (columns: ['text'])"),
    ("prompts", "a .docx file", lambda t, m: prompts_from(t, "p.docx", "x"), "prompts.source: unsupported file type '.docx'"),
    ("pairs", "a pair file that does not exist", lambda t, m: dpo(t, t / "none.jsonl"),
     "config field 'data.source': expected an existing pair dataset"),
    ("pairs", "an empty pair file", lambda t, m: pairs_from(t, ""), "data.source: {t}/pairs.jsonl has no pairs (it is empty)"),
    ("pairs", "a pair without `rejected`", lambda t, m: pairs_from(t, PAIR + '{"prompt": "a", "chosen": "b"}\n'),
     "data.source: line 2 of {t}/pairs.jsonl lacks ['rejected']"),
    ("pairs", "`chosen` that is a list", lambda t, m: pairs_from(t, '{"prompt": "a", "chosen": ["b"], "rejected": "c"}\n'),
     "data.source: line 1 of {t}/pairs.jsonl: 'chosen': text or one assistant message [{role: assistant, content}], got ['b']"),
    ("pairs", "a prompt message with an unknown role",
     lambda t, m: pairs_from(t, '{"prompt": [{"role": "bot", "content": "a"}], "chosen": "b", "rejected": "c"}\n'),
     "data.source: line 1 of {t}/pairs.jsonl: 'prompt'[0].role: one of system, user, assistant, tool, got 'bot'"),
    ("pairs", "a pair line that is not JSON", lambda t, m: pairs_from(t, PAIR + "prompt,chosen,rejected\n"),
     "data.source: line 2 of {t}/pairs.jsonl is not JSON"),
    ("pairs", "a pair line that is not UTF-8", lambda t, m: pairs_from(t, PAIR.encode() + b"\xff\xfe\n"),
     "data.source: line 2 of {t}/pairs.jsonl is not UTF-8"),
    ("pipeline", "an override naming a stage that comes later", lambda t, m: pipeline(t, "set.pairs=['bon.prompts.source=${bonbon}']"),
     "config field 'stages[0].overrides[0]': expected references ${name} to vars and earlier stages only"),
    ("pipeline", "`set` for a stage that does not exist", lambda t, m: pipeline(t, "set.nope=[seed=1]"),
     "config field 'set.nope': expected a stage name: pairs, rm, bonbon, evaluate"),
    ("pipeline", "a stage's own knob out of range", lambda t, m: pipeline(t, "set.bonbon=[bonbon.alpha=2]"),
     "config field 'stages[2] (bonbon, jobs.train_bonbon): bonbon.alpha': expected a number in [0, 1], got 2.0"),
]


@pytest.mark.parametrize("area, what, act, message", CASES, ids=[f"{a}: {w}" for a, w, _, _ in CASES])
def test_bad_input_is_named_and_nothing_is_written(tmp_path, tiny_lm_dir, area, what, act, message):
    with pytest.raises((ConfigError, ValueError)) as err:
        act(tmp_path, tiny_lm_dir)
    assert message.replace("{t}", str(tmp_path)) in str(err.value)
    assert not (tmp_path / "out").exists() and not (tmp_path / "runs").exists(), "nothing is written"


def test_the_table_has_at_least_30_cases():
    assert len(CASES) >= 30 and len({w for _, w, _, _ in CASES}) == len(CASES)


def table() -> str:
    """The README's table: each case's input and the error it gets (paths shortened to <dir>)."""
    import tempfile

    from conftest import save_tiny_lm

    rows = ["| area | input | error |", "|---|---|---|"]
    model = save_tiny_lm(Path(tempfile.mkdtemp()) / "tiny")
    for area, what, act, _ in CASES:
        with tempfile.TemporaryDirectory() as d:
            try:
                act(Path(d), model)
                msg = "(no error)"
            except (ConfigError, ValueError) as e:
                msg = str(e).replace(d, "<dir>")
        msg = msg if len(msg) < 160 else msg[:157] + "..."
        rows.append(f"| {area} | {what} | {msg.replace('|', '/')} |")
    return "\n".join(rows)


if __name__ == "__main__":
    import os

    os.chdir(Path(__file__).resolve().parents[1])
    print(table())
