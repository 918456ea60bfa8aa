"""align/data/prompts.py: load_prompts from every local source kind (text, JSONL, JSON, CSV, Parquet, a folder
of <split>.jsonl files, saved datasets directories), limit, and the errors that name a config field."""

import json
import re

import pytest

from align.data.prompts import load_prompts

PROMPTS = ["The movie was", "I thought the plot", "Honestly, the acting", "Four stars because"]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --- plain text ------------------------------------------------------------------------------------


def test_txt_one_prompt_per_line_blank_lines_dropped(tmp_path):
    p = tmp_path / "prompts.txt"
    p.write_text("\nThe movie was\n\n   \nI thought the plot\n\t\nHonestly, the acting\n")
    assert load_prompts(str(p)) == ["The movie was", "I thought the plot", "Honestly, the acting"]


def test_txt_ignores_column_and_split(tmp_path):
    p = tmp_path / "prompts.txt"
    p.write_text("a\nb\n")
    assert load_prompts(str(p), split="train", column="whatever") == ["a", "b"]


def test_txt_crlf_line_endings(tmp_path):
    p = tmp_path / "prompts.txt"
    p.write_bytes(b"first\r\n\r\nsecond\r\n")
    assert load_prompts(str(p)) == ["first", "second"]


# --- JSONL -----------------------------------------------------------------------------------------


def test_jsonl_default_column(tmp_path):
    p = write_jsonl(tmp_path / "p.jsonl", [{"prompt": t, "id": i} for i, t in enumerate(PROMPTS)])
    assert load_prompts(str(p)) == PROMPTS


def test_jsonl_column_selection_and_a_non_string_prompt_named(tmp_path):
    p = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "x", "text": "alpha"}, {"prompt": "y", "text": 7}])
    assert load_prompts(str(p), column="prompt") == ["x", "y"]
    with pytest.raises(ValueError, match=r"prompts\.column: line 2 of .*'text' must be a non-empty string or a list of \{role, content\} messages, got 7"):
        load_prompts(str(p), column="text")


def test_jsonl_blank_lines_skipped(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text('{"prompt": "a"}\n\n{"prompt": "b"}\n  \n')
    assert load_prompts(str(p)) == ["a", "b"]


def test_jsonl_missing_column_names_field_and_line(tmp_path):
    p = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}, {"prompt": "b"}, {"text": "c"}, {"text": "d"}])
    with pytest.raises(ValueError) as err:
        load_prompts(str(p))
    msg = str(err.value)
    assert "prompts.column" in msg
    assert "'prompt'" in msg
    assert re.search(r"\bline 3\b", msg), msg  # the first offending line, 1-based
    assert str(p) in msg


def test_jsonl_missing_column_on_first_line(tmp_path):
    p = write_jsonl(tmp_path / "p.jsonl", [{"text": "a"}, {"prompt": "b"}])
    with pytest.raises(ValueError, match=r"prompts\.column.*line 1\b"):
        load_prompts(str(p))


def test_jsonl_missing_column_line_number_counts_blank_lines(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text('{"prompt": "a"}\n\n{"text": "b"}\n')  # the bad record is on line 3 of the file
    with pytest.raises(ValueError, match=r"prompts\.column.*line 3\b"):
        load_prompts(str(p))


# --- JSON / CSV / Parquet via datasets --------------------------------------------------------------


def test_json_array_of_records(tmp_path):
    p = tmp_path / "p.json"
    p.write_text(json.dumps([{"prompt": t, "label": i} for i, t in enumerate(PROMPTS)]))
    assert load_prompts(str(p)) == PROMPTS


def test_json_column_selection(tmp_path):
    p = tmp_path / "p.json"
    p.write_text(json.dumps([{"prompt": "a", "text": "first"}, {"prompt": "b", "text": "second"}]))
    assert load_prompts(str(p), column="text") == ["first", "second"]


def test_csv_with_quoted_commas(tmp_path):
    p = tmp_path / "p.csv"
    p.write_text('id,prompt\n0,"The movie was"\n1,"Honestly, the acting"\n2,"A ""quoted"" start"\n')
    assert load_prompts(str(p)) == ["The movie was", "Honestly, the acting", 'A "quoted" start']
    assert load_prompts(str(p), column="id") == ["0", "1", "2"]


def test_parquet(tmp_path):
    import datasets

    p = tmp_path / "p.parquet"
    datasets.Dataset.from_dict({"prompt": PROMPTS, "n": list(range(len(PROMPTS)))}).to_parquet(str(p))
    assert load_prompts(str(p)) == PROMPTS


def test_datasets_file_missing_column_lists_columns(tmp_path):
    p = tmp_path / "p.csv"
    p.write_text("id,text\n0,hello\n1,world\n")
    with pytest.raises(ValueError) as err:
        load_prompts(str(p))
    msg = str(err.value)
    assert "prompts.column" in msg
    assert "'prompt'" in msg
    assert "['id', 'text']" in msg


# --- folders ---------------------------------------------------------------------------------------


def test_folder_of_split_jsonl_files_picks_split(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"prompt": "train a"}, {"prompt": "train b"}, {"prompt": "train c"}])
    write_jsonl(tmp_path / "test.jsonl", [{"prompt": "test a"}, {"prompt": "test b"}])
    assert load_prompts(str(tmp_path)) == ["test a", "test b"]  # split defaults to "test"
    assert load_prompts(str(tmp_path), split="train") == ["train a", "train b", "train c"]
    assert load_prompts(str(tmp_path), split="train", limit=2) == ["train a", "train b"]


def test_folder_of_split_jsonl_missing_column_names_field(tmp_path):
    write_jsonl(tmp_path / "test.jsonl", [{"prompt": "a"}, {"text": "b"}])
    with pytest.raises(ValueError, match=r"prompts\.column.*line 2\b"):
        load_prompts(str(tmp_path))


def test_saved_dataset_dict_picks_split(tmp_path):
    import datasets

    dd = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"prompt": ["tr 0", "tr 1", "tr 2"], "text": ["x", "y", "z"]}),
        "test": datasets.Dataset.from_dict({"prompt": ["te 0", "te 1"], "text": ["u", "v"]}),
    })
    dd.save_to_disk(str(tmp_path / "dd"))
    assert load_prompts(str(tmp_path / "dd")) == ["te 0", "te 1"]
    assert load_prompts(str(tmp_path / "dd"), split="train") == ["tr 0", "tr 1", "tr 2"]
    assert load_prompts(str(tmp_path / "dd"), split="train", column="text") == ["x", "y", "z"]


def test_saved_dataset_dir(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"prompt": PROMPTS, "score": [1.5, 2.0, 3.0, 4.0]}).save_to_disk(str(tmp_path / "ds"))
    assert load_prompts(str(tmp_path / "ds")) == PROMPTS
    assert load_prompts(str(tmp_path / "ds"), split="train") == PROMPTS  # a plain Dataset has no splits
    assert load_prompts(str(tmp_path / "ds"), column="score") == ["1.5", "2.0", "3.0", "4.0"]


def test_saved_dataset_missing_column_lists_columns(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"text": ["a"], "id": [0]}).save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(ValueError) as err:
        load_prompts(str(tmp_path / "ds"))
    msg = str(err.value)
    assert "prompts.column" in msg and "'prompt'" in msg
    assert "['text', 'id']" in msg


# --- limit and errors ------------------------------------------------------------------------------


@pytest.mark.parametrize("limit, expected", [(None, PROMPTS), (0, []), (1, PROMPTS[:1]), (3, PROMPTS[:3]), (99, PROMPTS)])
def test_limit(tmp_path, limit, expected):
    p = write_jsonl(tmp_path / "p.jsonl", [{"prompt": t} for t in PROMPTS])
    assert load_prompts(str(p), limit=limit) == expected


def test_limit_applies_to_datasets_sources(tmp_path):
    p = tmp_path / "p.json"
    p.write_text(json.dumps([{"prompt": t} for t in PROMPTS]))
    assert load_prompts(str(p), limit=2) == PROMPTS[:2]


def test_unsupported_suffix_names_source_field(tmp_path):
    p = tmp_path / "prompts.xml"
    p.write_text("<prompts><p>hi</p></prompts>")
    with pytest.raises(ValueError) as err:
        load_prompts(str(p))
    msg = str(err.value)
    assert "prompts.source" in msg
    assert "'.xml'" in msg


def test_tilde_path_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "p.txt").write_text("home prompt\n")
    assert load_prompts("~/p.txt") == ["home prompt"]
