"""Per-example eval losses (``eval_losses.json``) and the whole-sequence cross-entropy (``eval_loss_sequence``).

Each quantity is recomputed independently: the response sums one unpadded example at a time with
every position's logits, the whole-sequence loss by the model's own ``labels=`` loss in
transformers, and the run folder's file against the split and the tokenised records.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import make_records, tiny_model

import oloraplus.evaluation.evaluate
import oloraplus.fast.head_loss
from oloraplus.cli import main
from oloraplus.data.batching import IGNORE, collate
from oloraplus.data.tokenize import tokenize_records
from oloraplus.evaluation.evaluate import eval_loss
from oloraplus.fast.head_loss import fusable_head

FAMILIES = ["llama", "opt", "gemma"]
FILE_KEYS = ["format", "eval_indices", "response_loss_sum", "response_tokens", "sequence_loss_sum", "sequence_tokens"]
SPLIT = ["--n-train", "16", "--n-eval", "6", "--max-new-tokens", "4", "--precision", "fp32", "--no-progress",
         "--metrics-mode", "teacher-forced"]
TINY_RUN = [*SPLIT, "--rank", "4", "--batch-size", "4", "--max-steps", "2"]


def model_for(family: str, tokenizer):
    """A tiny model, frozen as a base under adapters is (the fused head loss takes only a frozen head)."""
    model = tiny_model(family, vocab_size=len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    if family == "gemma":
        model.config.final_logit_softcapping = 2.0  # Gemma 2's cap, small enough to change every loss
    model.requires_grad_(False)
    assert fusable_head(model) is not None
    return model


@pytest.fixture
def examples(tiny_tokenizer):
    kept, _ = tokenize_records(make_records(7), tiny_tokenizer, max_length=256)
    assert len({len(e.input_ids) for e in kept}) > 2  # batches of them need real padding
    return kept


@torch.no_grad()
def unpadded_sums(model, example) -> tuple[float, int, float, int]:
    """(response sum, response count, sequence sum, sequence count) of one example, no padding, all logits."""
    logits = model(input_ids=torch.tensor([example.input_ids])).logits[0, :-1].float()
    targets = torch.tensor(example.input_ids[1:])
    losses = F.cross_entropy(logits, targets, reduction="none")
    response = torch.tensor(example.labels[1:]) != IGNORE
    return losses[response].sum().item(), int(response.sum()), losses.sum().item(), len(targets)


@pytest.mark.parametrize("path", ["fused", "kept-logits", "plain"])
@pytest.mark.parametrize("chunk_rows", [1024, 7])  # 7: the logits of a batch in many chunks
@pytest.mark.parametrize("family", FAMILIES)
def test_per_example_sums_reproduce_eval_loss(family, path, chunk_rows, tiny_tokenizer, examples, monkeypatch):
    monkeypatch.setattr(oloraplus.evaluation.evaluate, "CE_CHUNK_ROWS", chunk_rows)
    fast = path != "plain"
    if path == "kept-logits":  # a head the fused loss cannot take: the logits path of --fast
        for module in (oloraplus.fast.head_loss, oloraplus.evaluation.evaluate):
            monkeypatch.setattr(module, "fusable_head", lambda model: None)
    model = model_for(family, tiny_tokenizer)
    pad = tiny_tokenizer.pad_token_id
    plain = eval_loss(model, examples, pad, batch_size=3, progress=False, fast=fast)
    result = eval_loss(model, examples, pad, batch_size=3, progress=False, fast=fast, per_example=True)
    assert result["eval_loss"] == plain["eval_loss"]  # the metric itself is computed as without per_example
    assert sum(result["response_tokens"]) == result["eval_tokens"] == plain["eval_tokens"]
    assert sum(result["response_loss_sum"]) / sum(result["response_tokens"]) == pytest.approx(result["eval_loss"],
                                                                                              rel=1e-6)
    # Each entry belongs to the example at the same position (the batches are length-sorted, not in order).
    for i, example in enumerate(examples):
        resp_sum, resp_n, seq_sum, seq_n = unpadded_sums(model, example)
        assert result["response_tokens"][i] == resp_n
        assert result["sequence_tokens"][i] == seq_n == len(example.input_ids) - 1
        assert result["response_loss_sum"][i] == pytest.approx(resp_sum, rel=1e-5)
        assert result["sequence_loss_sum"][i] == pytest.approx(seq_sum, rel=1e-5)
        assert seq_sum > resp_sum  # the prompt tokens add loss
    assert "response_loss_sum" not in plain  # the second forward only when asked for


@pytest.mark.parametrize("family", FAMILIES)
def test_sequence_loss_equals_the_models_own_labels_loss_on_a_padded_batch(family, tiny_tokenizer, examples):
    model = model_for(family, tiny_tokenizer)
    batch = collate(examples, tiny_tokenizer.pad_token_id)
    assert (batch["attention_mask"] == 0).any()
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE)  # labels=input_ids, pads ignored
    with torch.no_grad():
        hf = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).loss.float()
    for fast in (True, False):
        one_batch = eval_loss(model, examples, tiny_tokenizer.pad_token_id, batch_size=len(examples),
                              progress=False, fast=fast, per_example=True)
        assert one_batch["eval_loss_sequence"] == pytest.approx(hf.item(), rel=1e-5, abs=1e-5)
        assert one_batch["eval_sequence_tokens"] == int((labels[:, 1:] != IGNORE).sum())
        # Several batches: still the token-weighted mean over every example.
        batched = eval_loss(model, examples, tiny_tokenizer.pad_token_id, batch_size=3, progress=False, fast=fast,
                            per_example=True)
        assert batched["eval_loss_sequence"] == pytest.approx(hf.item(), rel=1e-5, abs=1e-5)
    assert one_batch["eval_loss_sequence"] != pytest.approx(one_batch["eval_loss"], rel=1e-3)  # not the response loss


def test_train_and_evaluate_write_eval_losses(tiny_checkpoint, records_file, tiny_tokenizer, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--model", str(tiny_checkpoint), "--data", str(records_file), "--output", str(out),
                 "--method", "olora", *TINY_RUN])
    assert code == 0, capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    losses = json.loads((out / "eval_losses.json").read_text())
    assert list(losses) == FILE_KEYS and losses["format"] == 1
    eval_idx = results["data"]["eval_indices"]
    assert losses["eval_indices"] == eval_idx and len(eval_idx) == 6
    for key in FILE_KEYS[2:]:
        assert len(losses[key]) == len(eval_idx)
        assert all(isinstance(v, int if key.endswith("tokens") else float) for v in losses[key])  # numbers only
    metrics = results["metrics"]
    assert sum(losses["response_loss_sum"]) / sum(losses["response_tokens"]) == pytest.approx(metrics["eval_loss"],
                                                                                              rel=1e-6)
    assert sum(losses["sequence_loss_sum"]) / sum(losses["sequence_tokens"]) == pytest.approx(
        metrics["eval_loss_sequence"], rel=1e-12)
    assert math.isfinite(metrics["eval_loss_sequence"]) and metrics["eval_loss_sequence"] != metrics["eval_loss"]
    assert "prompt + response" in results["evaluation"]["eval_loss_sequence"]
    assert results["evaluation"]["eval_sequence_tokens"] == sum(losses["sequence_tokens"])
    # Aligned with the records: the token counts of record eval_idx[k] are at position k.
    records = make_records(40)
    examples, _ = tokenize_records([records[i] for i in eval_idx], tiny_tokenizer, 512)
    assert losses["response_tokens"] == [sum(label != IGNORE for label in e.labels[1:]) for e in examples]
    assert losses["sequence_tokens"] == [len(e.input_ids) - 1 for e in examples]

    # `oloraplus evaluate` on the saved adapter writes the same file.
    again = tmp_path / "eval"
    code = main(["evaluate", "--model", str(tiny_checkpoint), "--data", str(records_file), "--output", str(again),
                 "--adapter", str(out / "adapter"), *SPLIT])
    assert code == 0, capsys.readouterr().err
    evaluated = json.loads((again / "eval_losses.json").read_text())
    assert list(evaluated) == FILE_KEYS and evaluated["eval_indices"] == eval_idx
    assert evaluated["sequence_tokens"] == losses["sequence_tokens"]
    assert evaluated["sequence_loss_sum"] == pytest.approx(losses["sequence_loss_sum"], rel=1e-5)
    assert json.loads((again / "results.json").read_text())["metrics"]["eval_loss_sequence"] == pytest.approx(
        metrics["eval_loss_sequence"], rel=1e-5)


def test_no_evaluate_writes_no_eval_losses(tiny_checkpoint, records_file, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--model", str(tiny_checkpoint), "--data", str(records_file), "--output", str(out),
                 "--method", "olora", "--n-val", "4", "--no-evaluate", *TINY_RUN])
    assert code == 0, capsys.readouterr().err
    assert (out / "results.json").is_file()
    assert not (out / "eval_losses.json").exists()
    assert "eval_loss_sequence" not in json.loads((out / "results.json").read_text())["metrics"]
