"""Alpaca records: loading and validation, the deterministic split, prompts and tokenisation."""

from __future__ import annotations

import hashlib
import json
import random

import pytest
from conftest import make_records

from oloraplus.data.records import PROMPT_NO_INPUT, PROMPT_WITH_INPUT, DataSource, format_prompt, load_records
from oloraplus.data.split import split_records
from oloraplus.data.tokenize import tokenize_record, tokenize_records
from oloraplus.errors import UserError


def write_json(path, obj):
    path.write_text(json.dumps(obj))
    return path


# --- loading ------------------------------------------------------------------------------


def test_load_json_list(records_file):
    source = load_records(str(records_file))
    assert source.records == make_records(40)
    assert source.sha256 == hashlib.sha256(records_file.read_bytes()).hexdigest()
    assert source.source == str(records_file.resolve())


def test_load_jsonl(tmp_path):
    records = make_records(5)
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")  # trailing blank lines are fine
    source = load_records(str(path))
    assert source.records == records
    assert source.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_missing_input_field_means_empty_input(tmp_path):
    records = [{"instruction": "Say hi.", "output": "hi"}]
    source = load_records(str(write_json(tmp_path / "d.json", records)))
    assert source.records == [{"instruction": "Say hi.", "input": "", "output": "hi"}]


def test_extra_fields_are_dropped(tmp_path):
    records = [{"instruction": "a", "input": "b", "output": "c", "id": 7}]
    assert load_records(str(write_json(tmp_path / "d.json", records))).records == [
        {"instruction": "a", "input": "b", "output": "c"}
    ]


GOOD = {"instruction": "a", "input": "", "output": "b"}


@pytest.mark.parametrize(
    ("content", "needles"),
    [
        ({"instruction": "a", "output": "b"}, ["expected a JSON list", "dict"]),
        ([GOOD, GOOD, "just text"], ["record 2", "str"]),
        ([GOOD, {"instruction": "a", "input": ""}], ["record 1", "'output'"]),
        ([{"input": "", "output": "b"}], ["record 0", "'instruction'"]),
        ([GOOD, {"instruction": "a", "input": 3, "output": "b"}], ["record 1", "'input'", "int"]),
        ([GOOD, GOOD, GOOD, {"instruction": ["a"], "output": "b"}], ["record 3", "'instruction'", "list"]),
        ([GOOD, {"instruction": "a", "output": None}], ["record 1", "'output'"]),
        ([], ["no records"]),
    ],
    ids=["not-a-list", "non-dict", "missing-output", "missing-instruction", "int-input",
         "list-instruction", "null-output", "empty-list"],
)
def test_invalid_records(tmp_path, content, needles):
    path = write_json(tmp_path / "bad.json", content)
    with pytest.raises(UserError) as info:
        load_records(str(path))
    message = str(info.value)
    assert str(path) in message
    for needle in needles:
        assert needle in message
    assert "\n" not in message


def test_invalid_jsonl_record_names_its_index(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps({"instruction": 1, "output": "x"}) + "\n")
    with pytest.raises(UserError, match=r"record 1 field 'instruction'") as info:
        load_records(str(path))
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    ("name", "data", "needle"),
    [
        ("truncated.json", json.dumps(make_records(3))[:-20].encode(), "not valid JSON"),
        ("garbage.json", b"{not json", "not valid JSON"),
        ("bad.jsonl", (json.dumps(GOOD) + "\n{oops\n").encode(), "line 2"),
        ("empty.json", b"", "empty"),
        ("blank.json", b"  \n\n", "empty"),
        ("latin1.json", json.dumps([GOOD]).replace('"b"', '"caf\xe9"').encode("latin-1"), "UTF-8"),
    ],
)
def test_unreadable_files(tmp_path, name, data, needle):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(UserError, match=needle) as info:
        load_records(str(path))
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name", ["missing.json", "missing.jsonl"])
def test_missing_file(tmp_path, name):
    with pytest.raises(UserError, match="not found") as info:
        load_records(str(tmp_path / name))
    assert name in str(info.value)


def test_directory_named_like_a_file(tmp_path):
    (tmp_path / "folder.json").mkdir()
    with pytest.raises(UserError, match="folder.json"):
        load_records(str(tmp_path / "folder.json"))


# --- split --------------------------------------------------------------------------------


def source_of(n: int) -> DataSource:
    return DataSource(make_records(n), "fixture", None)


def test_split_is_deterministic_and_disjoint():
    source = source_of(40)
    a = split_records(source, 12, 8, data_seed=3)
    b = split_records(source, 12, 8, data_seed=3)
    assert a.train_indices == b.train_indices and a.eval_indices == b.eval_indices
    assert len(a.train) == len(a.train_indices) == 12
    assert len(a.eval) == len(a.eval_indices) == 8
    assert not set(a.train_indices) & set(a.eval_indices)
    assert len(set(a.train_indices)) == 12 and len(set(a.eval_indices)) == 8
    assert all(0 <= i < 40 for i in a.train_indices + a.eval_indices)
    assert a.train == [source.records[i] for i in a.train_indices]
    assert a.eval == [source.records[i] for i in a.eval_indices]
    # The documented rule: shuffle all indices with random.Random(seed), train first then eval.
    order = list(range(40))
    random.Random(3).shuffle(order)
    assert a.train_indices == order[:12] and a.eval_indices == order[12:20]
    p = a.provenance
    assert (p["n_records"], p["data_seed"], p["n_train"], p["n_eval"]) == (40, 3, 12, 8)
    assert p["train_indices"] == a.train_indices and p["eval_indices"] == a.eval_indices


def test_different_seeds_give_different_splits():
    source = source_of(40)
    a = split_records(source, 12, 8, data_seed=1)
    b = split_records(source, 12, 8, data_seed=2)
    assert a.train_indices != b.train_indices


def test_eval_set_does_not_depend_on_n_train_growing_into_it():
    """Same seed, larger n_train: the training records are a prefix-extension of the smaller run's."""
    source = source_of(40)
    small, large = split_records(source, 10, 5, 7), split_records(source, 20, 5, 7)
    assert large.train_indices[:10] == small.train_indices


def test_split_uses_every_record_when_exact():
    split = split_records(source_of(10), 6, 4)
    assert sorted(split.train_indices + split.eval_indices) == list(range(10))


@pytest.mark.parametrize(("n_train", "n_eval"), [(8, 3), (11, 0), (0, 2), (-1, 2)])
def test_bad_split_sizes(n_train, n_eval):
    with pytest.raises(UserError):
        split_records(source_of(10), n_train, n_eval)


def test_too_few_records_message():
    with pytest.raises(UserError, match=r"10 records.*--n-train 8.*--n-eval 3"):
        split_records(source_of(10), 8, 3)


# --- prompts and tokens -------------------------------------------------------------------


def test_prompt_template_with_and_without_input():
    with_input = format_prompt({"instruction": "Add.", "input": "2 and 3", "output": "5"})
    assert with_input == (
        "Below is an instruction that describes a task, paired with an input that provides further "
        "context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nAdd.\n\n### Input:\n2 and 3\n\n### Response:\n"
    )
    without = format_prompt({"instruction": "Say hi.", "input": "", "output": "hi"})
    assert without == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nSay hi.\n\n### Response:\n"
    )
    assert "### Input:" not in without
    assert format_prompt({"instruction": "Say hi.", "output": "hi"}) == without
    assert PROMPT_WITH_INPUT.count("{") == 2 and PROMPT_NO_INPUT.count("{") == 1


def test_tokenize_record_labels_only_the_response(tiny_tokenizer):
    record = make_records(1)[0]
    assert record["input"]  # record 0 has an input section
    example = tokenize_record(record, tiny_tokenizer, max_length=512, index=5)
    prompt = tiny_tokenizer(format_prompt(record), add_special_tokens=True)["input_ids"]
    response = tiny_tokenizer(record["output"], add_special_tokens=False)["input_ids"]
    assert len(response) >= 3
    assert example.input_ids == prompt + response + [tiny_tokenizer.eos_token_id]
    assert example.labels == [-100] * len(prompt) + response + [tiny_tokenizer.eos_token_id]
    assert example.prompt_len == len(prompt)
    assert example.labels[-1] == tiny_tokenizer.eos_token_id
    assert not example.truncated and example.index == 5
    assert tiny_tokenizer.decode(example.input_ids[example.prompt_len:], skip_special_tokens=True) == \
        tiny_tokenizer.decode(response)


def test_truncation_counted_and_empty_responses_dropped(tiny_tokenizer):
    records = make_records(6)
    full = [tokenize_record(r, tiny_tokenizer, 10_000) for r in records]
    lengths = [len(e.input_ids) for e in full]
    prompts = [e.prompt_len for e in full]
    assert len(set(prompts)) > 1  # records with an input have longer prompts
    # One token past the shortest prompt: the shortest-prompt records keep one response token,
    # the longer ones lose their whole response.
    limit = min(prompts) + 1
    examples, stats = tokenize_records(records, tiny_tokenizer, max_length=limit)
    expected_dropped = [i for i, p in enumerate(prompts) if p >= limit]
    expected_truncated = [i for i, n in enumerate(lengths) if n > limit]
    assert expected_dropped and len(expected_dropped) < len(records)
    assert stats.records == 6
    assert stats.dropped == len(expected_dropped)
    assert stats.truncated == len(expected_truncated)
    assert [e.index for e in examples] == [i for i in range(6) if i not in expected_dropped]
    for e in examples:
        assert len(e.input_ids) == len(e.labels) <= limit
        assert any(label != -100 for label in e.labels)
        whole = full[e.index]
        assert e.input_ids == whole.input_ids[:limit] and e.labels == whole.labels[:limit]
        assert e.truncated == (len(whole.input_ids) > limit)
    assert stats.tokens == sum(len(e.input_ids) for e in examples)
    assert stats.response_tokens == sum(sum(label != -100 for label in e.labels) for e in examples)


def test_untruncated_stats(tiny_tokenizer):
    examples, stats = tokenize_records(make_records(4), tiny_tokenizer, max_length=512)
    assert (stats.records, stats.truncated, stats.dropped) == (4, 0, 0)
    assert [e.index for e in examples] == [0, 1, 2, 3]


def test_alpaca_csv_and_jsonl_give_the_records_of_the_json_file(records_file, tmp_path):
    import csv

    records = make_records(40)
    with (tmp_path / "d.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["instruction", "input", "output"])
        writer.writeheader()
        writer.writerows(records)
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    sources = [load_records(str(p)) for p in (records_file, tmp_path / "d.csv", tmp_path / "d.jsonl")]
    assert all(s.records == records for s in sources)
    assert len({s.records_sha256 for s in sources}) == 1 and len({s.sha256 for s in sources}) == 3
    assert len({tuple(split_records(s, 16, 8).train_indices) for s in sources}) == 1
