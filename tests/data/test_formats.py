"""Data formats (data/formats.py): Alpaca byte-identical to earlier versions, prompt-completion with
column mapping and templates, chat with the tokenizer's chat template, --format auto, csv/parquet
files, counted skips, the default data's hub fallback, and every error as one line."""

from __future__ import annotations

import copy
import csv
import json
import sys
import types

import pytest
from conftest import assert_one_error_line, make_records, save_tiny_llama

import oloraplus.data.records as records_module
from oloraplus.cli import main
from oloraplus.data.formats import ChatFormat, load_data
from oloraplus.data.records import DEFAULT_DATA, format_prompt, load_records, records_sha256
from oloraplus.data.split import split_records
from oloraplus.data.tokenize import tokenize_records
from oloraplus.errors import UserError

# A chat template the tiny word-level tokenizer can render (role names are <unk>; <eos> ends a turn).
CHAT_TEMPLATE = (
    "{% for m in messages %}### {{ m['role'] }} : {{ m['content'] }} <eos> {% endfor %}"
    "{% if add_generation_prompt %}### assistant : {% endif %}"
)


def reference_tokenize(record: dict, tokenizer, max_length: int):
    """The tokenisation of oloraplus before data formats existed (data/tokenize.py tokenize_record), verbatim."""
    prompt_ids = tokenizer(format_prompt(record), add_special_tokens=True)["input_ids"]
    response_ids = tokenizer(record["output"], add_special_tokens=False)["input_ids"]
    response_ids = response_ids + [tokenizer.eos_token_id]
    ids = prompt_ids + response_ids
    labels = [-100] * len(prompt_ids) + response_ids
    truncated = len(ids) > max_length
    return ids[:max_length], labels[:max_length], min(len(prompt_ids), max_length), truncated


@pytest.fixture
def chat_tokenizer(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def chat_records(n: int) -> list[dict]:
    rows = []
    for r in make_records(n):
        messages = [{"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["output"]}]
        if r["input"]:
            messages = [{"role": "system", "content": r["input"]}, *messages,
                        {"role": "user", "content": "Write more."}, {"role": "assistant", "content": "story ."}]
        rows.append({"messages": messages})
    return rows


# --- alpaca: byte-identical -----------------------------------------------------------------


@pytest.mark.parametrize("max_length", [512, 40, 30])
@pytest.mark.parametrize("fmt", ["auto", "alpaca"])
def test_alpaca_ids_labels_and_split_are_unchanged(records_file, tiny_tokenizer, fmt, max_length, capsys):
    old = load_records(str(records_file))
    new = load_data(str(records_file), fmt)
    assert new.records == old.records == make_records(40) and new.format == "alpaca"
    assert new.sha256 == old.sha256 and new.records_sha256 == records_sha256(old.records)
    assert split_records(new, 16, 8, 42, 2).provenance == split_records(old, 16, 8, 42, 2).provenance
    examples, stats = tokenize_records(new.records, tiny_tokenizer, max_length, new.format)
    for e in examples:
        ids, labels, prompt_len, truncated = reference_tokenize(new.records[e.index], tiny_tokenizer, max_length)
        assert (e.input_ids, e.labels, e.prompt_len, e.truncated) == (ids, labels, prompt_len, truncated)
    kept = [i for i, r in enumerate(new.records)
            if any(x != -100 for x in reference_tokenize(r, tiny_tokenizer, max_length)[1])]
    assert [e.index for e in examples] == kept and stats.dropped == 40 - len(kept)
    assert "format (detected" not in capsys.readouterr().err  # Alpaca runs log as they always did


# --- prompt-completion -------------------------------------------------------------------------


def write_csv(path, rows, columns):
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def qa_rows(n):
    return [{"question": r["instruction"], "context": r["input"], "answer": r["output"]} for r in make_records(n)]


def test_csv_with_mapped_columns_and_template(tmp_path, tiny_tokenizer):
    path = write_csv(tmp_path / "qa.csv", qa_rows(6), ["question", "context", "answer"])
    plain = load_data(str(path), "auto", prompt_field="question", response_field="answer")
    assert plain.format == "prompt-completion"
    assert plain.records[0] == {"prompt": make_records(1)[0]["instruction"], "response": make_records(1)[0]["output"]}
    templ = load_data(str(path), "prompt-completion", response_field="answer", template="Q: {question} ( {context} )")
    assert templ.records[1]["prompt"] == f"Q: {make_records(2)[1]['instruction']} (  )"
    (ex,), _ = tokenize_records(templ.records[:1], tiny_tokenizer, 512, "prompt-completion")
    prompt = tiny_tokenizer(templ.records[0]["prompt"])["input_ids"]
    assert ex.input_ids[: ex.prompt_len] == prompt and ex.labels[: ex.prompt_len] == [-100] * len(prompt)
    assert ex.input_ids[-1] == tiny_tokenizer.eos_token_id and ex.labels[ex.prompt_len:] == ex.input_ids[ex.prompt_len:]


def test_parquet_and_default_columns_detected(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    rows = [{"prompt": r["instruction"], "completion": r["output"]} for r in make_records(5)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    source = load_data(str(tmp_path / "d.parquet"))
    assert source.format == "prompt-completion" and len(source.records) == 5 and source.sha256


def test_empty_and_missing_records_are_counted(tmp_path):
    rows = qa_rows(6)
    rows[1]["answer"], rows[2]["question"] = "  ", ""
    del rows[3]["answer"]
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    source = load_data(str(path), prompt_field="question", response_field="answer")
    assert len(source.records) == 3 and source.skipped == {"empty": 2, "missing_field": 1}


def test_parquet_without_pyarrow_is_one_error(tmp_path, monkeypatch):
    (tmp_path / "d.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(UserError, match="needs pyarrow: pip install pyarrow"):
        load_data(str(tmp_path / "d.parquet"))


# --- chat ---------------------------------------------------------------------------------------


def test_chat_labels_cover_every_assistant_turn(chat_tokenizer):
    record = {"messages": [{"role": "system", "content": "Use the word river ."},
                           {"role": "user", "content": "Write about the stone ."},
                           {"role": "assistant", "content": "green music ."},
                           {"role": "user", "content": "Write more ."},
                           {"role": "assistant", "content": "quiet ocean ."}]}
    ids, labels, prompt_len = ChatFormat.render(record, chat_tokenizer)
    vocab = chat_tokenizer.convert_ids_to_tokens
    scored = [vocab(i) for i, label in zip(ids, labels, strict=True) if label != -100]
    assert scored == ["green", "music", ".", "<eos>", "quiet", "ocean", ".", "<eos>"]
    assert "river" in vocab(ids)  # the system prompt is kept
    assert vocab(ids[:prompt_len])[-3:] == ["###", "<unk>", ":"] and vocab(ids[prompt_len]) == "quiet"
    assert ChatFormat.reference(record) == "quiet ocean ."


def test_chat_jsonl_detected_and_rendered(tmp_path, chat_tokenizer, capsys):
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in chat_records(6)))
    source = load_data(str(path))
    assert source.format == "chat" and "chat format (detected" in capsys.readouterr().err
    examples, stats = tokenize_records(source.records, chat_tokenizer, 512, "chat")
    assert stats.dropped == 0 and all(any(x != -100 for x in e.labels) for e in examples)


# --- end to end from the CLI with a YAML --config ----------------------------------------------


def run_train(tmp_path, ckpt, data, capsys, **settings):
    config = tmp_path / "run.yaml"
    lines = {"model": str(ckpt), "data": str(data), "output": str(tmp_path / "run"), "method": "olora-plus",
             "ratio": 4, "rank": 4, "n_train": 8, "n_eval": 4, "max_steps": 2, "max_new_tokens": 4,
             "precision": "fp32", "progress": False, **settings}
    config.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in lines.items()))
    code = main(["train", "--config", str(config)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads((tmp_path / "run" / "results.json").read_text()), captured.err


def test_chat_jsonl_trains_end_to_end(tmp_path, tiny_tokenizer, capsys):
    tiny_tokenizer.chat_template = CHAT_TEMPLATE
    try:
        ckpt = save_tiny_llama(tmp_path / "tiny-chat", tiny_tokenizer)
    finally:
        tiny_tokenizer.chat_template = None
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in chat_records(14)) + json.dumps({"messages": []}) + "\n")
    results, err = run_train(tmp_path, ckpt, path, capsys, report_to="tensorboard", max_steps=10)
    assert results["data"]["format"] == "chat" and results["config"]["format"] == "auto"
    assert results["data"]["skipped"] == {"empty": 1, "missing_field": 0}
    assert "kept 14 of 15 records" in err and "1 empty" in err
    rows = [json.loads(line) for line in (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and rows[0]["reference"]
    assert_tensorboard_has_the_losses(tmp_path / "run", results)
    # the exported adapter answers through `oloraplus generate`, with the chat template by default
    messages = [{"role": "user", "content": "Write about the stone ."}]
    prompt = tiny_tokenizer.__class__.from_pretrained(ckpt).apply_chat_template(messages, tokenize=False,
                                                                                   add_generation_prompt=True)
    assert generate_answer(ckpt, tmp_path / "run", "Write about the stone .", capsys) == \
        reference_answer(ckpt, tmp_path / "run" / "adapter", prompt, special_tokens=False)


def test_csv_with_custom_columns_trains_end_to_end(tmp_path, module_checkpoint, capsys):
    path = write_csv(tmp_path / "qa.csv", qa_rows(14), ["question", "context", "answer"])
    results, _ = run_train(tmp_path, module_checkpoint, path, capsys, template="Write {question} {context}",
                           response_field="answer", report_to="tensorboard", max_steps=10)
    assert results["data"]["format"] == "prompt-completion" and results["data"]["records_sha256"]
    refs = [json.loads(line)["reference"] for line in (tmp_path / "run" / "predictions.jsonl").read_text().split("\n")
            if line]
    assert refs == [qa_rows(14)[i]["answer"] for i in results["data"]["eval_indices"]]
    assert_tensorboard_has_the_losses(tmp_path / "run", results)
    # prompt-completion data: generate passes the prompt as given (as the template filled it in training)
    prompt = "Write number 3 the stone"
    assert generate_answer(module_checkpoint, tmp_path / "run", prompt, capsys) == \
        reference_answer(module_checkpoint, tmp_path / "run" / "adapter", prompt)


def assert_tensorboard_has_the_losses(run, results):
    """The run's TensorBoard event file holds its logged training losses at their steps."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from oloraplus.training.tracking import LOGS_FOLDER

    events = EventAccumulator(str(run / LOGS_FOLDER))
    events.Reload()
    logged = {e.step: e.value for e in events.Scalars("train/loss")}
    expected = {row["step"]: row["loss"] for row in results["training"]["log"]}
    assert expected and logged.keys() == expected.keys()
    assert all(logged[step] == pytest.approx(value, rel=1e-6) for step, value in expected.items())


def generate_answer(ckpt, run, prompt, capsys) -> str:
    """``oloraplus generate`` on the run's exported standard LoRA (``adapter-lora/``), default template."""
    code = main(["generate", "--model", str(ckpt), "--adapter", str(run / "adapter-lora"), "--prompt", prompt,
                 "--max-new-tokens", "6"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out.strip()


def reference_answer(ckpt, adapter, text, special_tokens=True) -> str:
    """Greedy answer to ``text`` (tokenized as training tokenizes prompts) of the trained adapter
    (``adapter/``, OLoRA init re-run by PEFT), merged, through ``model.generate``."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    base = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    ids = tokenizer(text, add_special_tokens=special_tokens, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = merged.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                              do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


# --- errors: one line each ----------------------------------------------------------------------


def train_argv(tmp_path, ckpt, data, *flags):
    return ["train", "--model", str(ckpt), "--data", str(data), "--output", str(tmp_path / "o"), "--method",
            "olora-plus", "--ratio", "4", "--n-train", "4", "--n-eval", "2", "--max-steps", "1", "--no-progress",
            *flags]


@pytest.mark.parametrize(("rows", "flags", "needles"), [
    (qa_rows(8), ["--prompt-field", "query", "--response-field", "answer"], ["no record has the column 'query'",
                                                                             "question"]),
    (qa_rows(8), ["--response-field", "answer", "--template", "Q: {quest}"], ["--template slot {quest} is not a "
                                                                              "column"]),
    ([{"messages": "hi"}] * 8, [], ["record 0 'messages' is a str"]),
    ([{"messages": [{"role": "user"}]}] * 8, [], ["record 0 message 0 is malformed"]),
    ([{"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}] * 8, [],
     ["record 0 message 1 has unknown role 'bot'"]),
    ([{"messages": [{"role": "user", "content": "a"}]}] * 8, [], ["no usable record", "empty"]),
    ([{"x": 1}] * 8, ["--format", "prompt-completion"], ["no record has the column 'prompt'"]),
], ids=["wrong-column", "unknown-slot", "messages-not-list", "malformed-message", "unknown-role", "all-empty",
        "default-columns-missing"])
def test_format_errors_are_one_line(tmp_path, module_checkpoint, capsys, monkeypatch, rows, flags, needles):
    import oloraplus.training.recipe as recipe

    monkeypatch.setattr(recipe, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert_one_error_line(train_argv(tmp_path, module_checkpoint, path, *flags), capsys, *needles)


@pytest.mark.parametrize(("name", "content", "needle"), [
    ("d.csv", "", "file is empty"), ("d.csv", "question,answer\n", "no rows below the header"),
    ("d.jsonl", "", "file is empty"), ("d.parquet", "", "file is empty")])
def test_empty_files_are_one_line(tmp_path, module_checkpoint, capsys, name, content, needle):
    (tmp_path / name).write_text(content)
    assert_one_error_line(train_argv(tmp_path, module_checkpoint, tmp_path / name), capsys, needle)


@pytest.mark.parametrize(("flags", "needle"), [
    (["--format", "chat", "--prompt-field", "q"], "--prompt-field applies to --format prompt-completion"),
    (["--template", "Q: {0"], "is not a valid template"),
    (["--template", "Q: {a}", "--prompt-field", "q"], "drop --prompt-field or --template"),
])
def test_format_flag_errors(tmp_path, module_checkpoint, records_file, capsys, flags, needle):
    assert_one_error_line(train_argv(tmp_path, module_checkpoint, records_file, *flags), capsys, needle)


# --- the default data: $OLORAPLUS_DATA, the local file, the hub's tatsu-lab/alpaca ---------------


class FakeDataset(list):
    _fingerprint = "fake"


def test_default_data_falls_back_to_the_hub_with_the_same_records(tmp_path, records_file, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no ../shared/data/alpaca here
    monkeypatch.delenv("OLORAPLUS_DATA", raising=False)
    asked = []

    def load_dataset(name, split):
        asked.append((name, split))
        return FakeDataset({**r, "text": "x"} for r in make_records(40))  # the hub adds a text column

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    hub = load_data(DEFAULT_DATA)
    local = load_data(str(records_file))
    assert asked == [("tatsu-lab/alpaca", "train")] and hub.source == "hub:tatsu-lab/alpaca@fake"
    assert hub.records == local.records and hub.records_sha256 == local.records_sha256 and hub.sha256 is None
    assert split_records(hub, 16, 8).train_indices == split_records(local, 16, 8).train_indices

    monkeypatch.setenv("OLORAPLUS_DATA", str(records_file))
    assert load_data(DEFAULT_DATA).source == str(records_file.resolve())


def test_default_data_offline_names_both_ways(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("OLORAPLUS_DATA", raising=False)

    def load_dataset(name, split):
        raise ConnectionError("offline")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    with pytest.raises(UserError) as info:
        load_data(DEFAULT_DATA)
    message = str(info.value)
    assert "\n" not in message and "alpaca_data.json" in message and "OLORAPLUS_DATA" in message
    assert "tatsu-lab/alpaca" in message and "online" in message
    assert records_module.resolve_data(DEFAULT_DATA) == "tatsu-lab/alpaca"


def test_chat_without_a_chat_template_is_one_line(tmp_path, module_checkpoint, capsys):
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in chat_records(8)))
    assert_one_error_line(train_argv(tmp_path, module_checkpoint, path, "--format", "chat"), capsys,
                          "--format chat needs a tokenizer with a chat template")
