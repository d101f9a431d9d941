"""The command line end to end on a tiny checkpoint, the adapter round trip, and user errors."""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys

import pytest
import torch
from conftest import assert_one_error_line, make_records
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from oloraplus.cli import main
from oloraplus.data.batching import collate
from oloraplus.data.tokenize import tokenize_records
from oloraplus.method.adapters import OLoRAPlusConfig, apply_olora
from oloraplus.method.loss import response_loss
from oloraplus.method.optim import create_optimizer

METRICS = ("eval_loss", "perplexity", "bleu", "rouge1", "rouge2", "rougeL")
SPLIT_FLAGS = ["--n-train", "16", "--n-eval", "8", "--max-new-tokens", "8", "--precision", "fp32", "--no-progress"]


def run_ok(argv: list[str], capsys) -> str:
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out


def test_train_writes_a_complete_run_and_evaluate_reproduces_it(tiny_checkpoint, records_file, tmp_path, capsys):
    out = tmp_path / "run"
    stdout = run_ok(["train", "--model", str(tiny_checkpoint), "--data", str(records_file), "--output", str(out),
                     "--method", "olora-plus", "--ratio", "4", "--max-steps", "2", "--rank", "4", *SPLIT_FLAGS],
                    capsys)
    assert "eval_loss" in stdout and str(out / "results.json") in stdout

    results = json.loads((out / "results.json").read_text())
    metrics = results["metrics"]
    for key in METRICS:
        assert math.isfinite(metrics[key]), key
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]))
    assert 0 < metrics["eval_loss"] < 20

    config = results["config"]
    assert (config["n_train"], config["n_eval"], config["max_steps"], config["rank"]) == (16, 8, 2, 4)
    assert (config["method"], config["ratio"], config["precision"]) == ("olora-plus", 4.0, "fp32")
    assert results["method"]["lr_B"] == pytest.approx(4 * results["method"]["lr_A"])
    assert results["training"]["steps"] == 2
    assert math.isfinite(results["training"]["train_loss"])

    data = results["data"]
    assert data["sha256"] == hashlib.sha256(records_file.read_bytes()).hexdigest()
    assert data["n_records"] == 40
    train_idx, eval_idx = data["train_indices"], data["eval_indices"]
    assert len(train_idx) == len(set(train_idx)) == 16
    assert len(eval_idx) == len(set(eval_idx)) == 8
    assert not set(train_idx) & set(eval_idx)

    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 8
    records = make_records(40)
    assert [r["reference"] for r in rows] == [records[i]["output"] for i in eval_idx]
    assert all(set(r) >= {"prompt", "reference", "prediction"} for r in rows)
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["init_lora_weights"] == "olora"

    # `oloraplus evaluate` loads the saved adapter on the ORIGINAL checkpoint with plain PEFT.
    again = tmp_path / "eval"
    run_ok(["evaluate", "--model", str(tiny_checkpoint), "--data", str(records_file), "--output", str(again),
            "--adapter", str(out / "adapter"), *SPLIT_FLAGS], capsys)
    evaluated = json.loads((again / "results.json").read_text())
    assert evaluated["metrics"]["eval_loss"] == pytest.approx(metrics["eval_loss"], abs=1e-5)
    assert evaluated["data"]["eval_indices"] == eval_idx
    assert [json.loads(line)["prediction"] for line in (again / "predictions.jsonl").read_text().splitlines()] == [
        r["prediction"] for r in rows
    ]


def test_adapter_round_trip_with_plain_peft(tiny_checkpoint, tmp_path):
    """Train a little in-process, save, reload on a fresh original base: same logits."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    examples, _ = tokenize_records(make_records(6), tokenizer, max_length=128)
    batch = collate(examples, tokenizer.pad_token_id)

    original = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()
    with torch.no_grad():
        original_logits = original(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    model = apply_olora(AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32),
                        OLoRAPlusConfig(rank=4))
    optimizer = create_optimizer(model, lr=1e-2, ratio=4.0)
    model.train()
    for _ in range(3):
        loss = response_loss(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        trained_logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    # Training moved the model (else the comparison below would prove nothing).
    assert (trained_logits - original_logits).abs().max() > 1e-2
    model.save_pretrained(tmp_path / "adapter")

    base = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32)
    reloaded = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        reloaded_logits = reloaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    # PEFT re-runs its own (full) QR on the original weights: the base residual matches ours to
    # fp32 rounding (~1e-6 per weight), so the logits agree to fp32 rounding, far below what
    # training changed.
    scale = trained_logits.abs().max().item()
    torch.testing.assert_close(reloaded_logits, trained_logits, rtol=1e-4, atol=1e-4 * scale)
    assert ((reloaded_logits - trained_logits).norm() / trained_logits.norm()).item() < 1e-5


# --- user errors ----------------------------------------------------------------------------


def assert_user_error(argv: list[str], capsys, needle: str) -> None:
    assert_one_error_line(argv, capsys, needle)


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--method", "olora-plus"], "--ratio"),
        (["--method", "olora-plus", "--ratio", "0"], "ratio"),
        (["--method", "olora-plus", "--ratio", "nan"], "ratio"),
        (["--method", "olora", "--ratio", "4"], "olora-plus"),
        (["--method", "olora", "--rank", "0"], "rank"),
        (["--method", "olora", "--n-eval", "0"], "n-eval"),
    ],
)
def test_bad_flags(flags, needle, tiny_checkpoint, records_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert_user_error(["train", "--model", str(tiny_checkpoint), "--data", str(records_file),
                       "--output", str(out), *flags], capsys, needle)
    assert not out.exists(), "flags must be checked before anything is written"


def test_non_empty_output_needs_overwrite(tiny_checkpoint, records_file, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("earlier work")
    assert_user_error(["train", "--model", str(tiny_checkpoint), "--data", str(records_file), "--output", str(out),
                       "--method", "olora", "--max-steps", "1", *SPLIT_FLAGS], capsys, "--overwrite")
    assert (out / "keep.txt").read_text() == "earlier work"


def test_unknown_model(records_file, tmp_path, capsys):
    assert_user_error(["train", "--model", "no-such-model", "--data", str(records_file),
                       "--output", str(tmp_path / "run"), "--method", "olora", *SPLIT_FLAGS], capsys, "no-such-model")


def test_missing_data_file(tiny_checkpoint, tmp_path, capsys):
    assert_user_error(["train", "--model", str(tiny_checkpoint), "--data", str(tmp_path / "nope.json"),
                       "--output", str(tmp_path / "run"), "--method", "olora", *SPLIT_FLAGS], capsys, "nope.json")


@pytest.mark.slow
def test_python_m_help():
    done = subprocess.run([sys.executable, "-m", "oloraplus", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "usage: oloraplus" in done.stdout
    for command in ("train", "evaluate", "models"):
        assert command in done.stdout
