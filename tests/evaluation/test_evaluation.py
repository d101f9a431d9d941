"""Evaluation against the model's own references: HF loss, per-prompt generate, full logits.

``evaluation.py`` trims work (LM head only at response positions, length-sorted batches,
left-padded batched generation); each test recomputes the same quantity the slow, obvious way.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import make_records, tiny_model

from oloraplus.data.batching import collate
from oloraplus.data.tokenize import tokenize_records
from oloraplus.evaluation.evaluate import eval_loss, evaluate_model
from oloraplus.evaluation.generation import (
    PreallocatedLayer,
    generate_responses,
    greedy_decode,
    preallocated_cache,
)
from oloraplus.evaluation.metrics import compute_text_metrics
from oloraplus.method.loss import response_loss

FAMILIES = ["llama", "opt", "gemma"]


def model_for(family: str, tokenizer):
    model = tiny_model(family, vocab_size=len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


@pytest.fixture
def examples(tiny_tokenizer):
    kept, _ = tokenize_records(make_records(7), tiny_tokenizer, max_length=256)
    assert len({len(e.input_ids) for e in kept}) > 2  # a batch of them needs real padding
    return kept


@torch.no_grad()
def full_logits(model, example) -> torch.Tensor:
    """Logits of one unpadded example, (T, vocab)."""
    return model(input_ids=torch.tensor([example.input_ids])).logits[0].float()


@pytest.mark.parametrize("family", FAMILIES)
def test_response_loss_equals_hf_loss_on_padded_batch(family, tiny_tokenizer, examples):
    model = model_for(family, tiny_tokenizer)
    batch = collate(examples, tiny_tokenizer.pad_token_id)
    assert (batch["attention_mask"] == 0).any()
    with torch.no_grad():
        ours = response_loss(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        hf = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    assert torch.isfinite(ours)
    torch.testing.assert_close(ours, hf.float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_eval_loss_is_token_weighted_mean(family, tiny_tokenizer, examples):
    model = model_for(family, tiny_tokenizer)
    total, count = 0.0, 0
    for e in examples:  # one example at a time, no padding, the full vocabulary projection
        logits = full_logits(model, e)
        targets = torch.tensor(e.labels[1:])
        keep = targets != -100
        total += F.cross_entropy(logits[:-1][keep], targets[keep], reduction="sum").item()
        count += int(keep.sum())
    result = eval_loss(model, examples, tiny_tokenizer.pad_token_id, batch_size=3, progress=False)
    assert result["eval_tokens"] == count
    assert result["eval_loss"] == pytest.approx(total / count, rel=1e-5)
    # Not the mean of per-example means (the examples have different response lengths).
    per_example = []
    for e in examples:
        targets = torch.tensor(e.labels[1:])
        keep = targets != -100
        per_example.append(F.cross_entropy(full_logits(model, e)[:-1][keep], targets[keep]).item())
    assert result["eval_loss"] != pytest.approx(sum(per_example) / len(per_example), rel=1e-6)


def reference_generate(model, prompt: list[int], max_new_tokens: int, eos_ids: list[int]) -> list[int]:
    out = model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos_ids,
                         pad_token_id=model.generation_config.pad_token_id)
    new = out[0, len(prompt):].tolist()
    for n, t in enumerate(new):
        if t in eos_ids:
            return new[: n + 1]
    return new


def first_new_token_at(model, prompts, max_new_tokens, eos_id, position=2) -> int:
    """A token some prompt generates at ``position`` and not before it."""
    for prompt in prompts:
        tokens = reference_generate(model, prompt, max_new_tokens, [eos_id])
        if len(tokens) > position + 1 and tokens[position] not in tokens[:position]:
            return tokens[position]
    raise AssertionError("the random model's generations are too repetitive for this test")


# Not Gemma: the tiny random Gemma repeats one token, which makes the comparison weak.
@pytest.mark.parametrize("family", ["llama", "opt"])
def test_batched_generation_matches_one_at_a_time(family, tiny_tokenizer, examples):
    model = model_for(family, tiny_tokenizer)
    prompts = [e.input_ids[: e.prompt_len] for e in examples]
    max_new = 8
    # Make a prompt stop early: declare a token it produces mid-way a second EOS, so a batch
    # holds a finished sequence next to running ones.
    stop = first_new_token_at(model, prompts, max_new, tiny_tokenizer.eos_token_id)
    model.generation_config.eos_token_id = [tiny_tokenizer.eos_token_id, stop]
    eos_ids = sorted({tiny_tokenizer.eos_token_id, stop})
    expected = [reference_generate(model, p, max_new, eos_ids) for p in prompts]
    assert any(len(t) < max_new for t in expected) and any(len(t) == max_new for t in expected)

    texts, n_new = generate_responses(model, tiny_tokenizer, prompts, max_new_tokens=max_new,
                                      batch_size=4, progress=False)
    assert n_new == sum(len(t) for t in expected)
    assert texts == [tiny_tokenizer.decode(t, skip_special_tokens=True).strip() for t in expected]


@pytest.mark.parametrize("chunk_rows", [1024, 7])  # 7: many logit chunks per batch, cut inside rows
@pytest.mark.parametrize("frozen", [True, False])  # frozen: the fused head path (fast.head_loss) with fast
@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("family", FAMILIES)
def test_teacher_forced_predictions_are_argmax_of_full_logits(family, fast, frozen, chunk_rows, tiny_tokenizer,
                                                              examples, monkeypatch):
    """The predictions come from the eval loss's own logits (padded batches, chunks); the reference is
    each example alone, unpadded, with every position's logits."""
    monkeypatch.setattr("oloraplus.evaluation.evaluate.CE_CHUNK_ROWS", chunk_rows)
    model = model_for(family, tiny_tokenizer)
    model.requires_grad_(not frozen)
    if family == "gemma":
        model.config.final_logit_softcapping = 2.0  # Gemma 2's cap, small enough to matter
    expected = []
    for e in examples:
        predicted = full_logits(model, e).argmax(-1)
        positions = [t - 1 for t in range(1, len(e.labels)) if e.labels[t] != -100]
        assert positions[0] == e.prompt_len - 1
        expected.append(tiny_tokenizer.decode(predicted[positions].tolist(), skip_special_tokens=True).strip())
    references = [make_records(7)[e.index]["output"] for e in examples]
    _, predictions, _ = evaluate_model(model, tiny_tokenizer, examples, references, metrics_mode="teacher-forced",
                                       batch_size=3, progress=False, fast=fast)
    got = [p["prediction"] for p in predictions]
    assert got == expected
    assert any(got)


def test_evaluate_model_reports_consistent_metrics(tiny_tokenizer, examples):
    model = model_for("llama", tiny_tokenizer)
    references = [make_records(7)[e.index]["output"] for e in examples]
    metrics, predictions, details = evaluate_model(model, tiny_tokenizer, examples, references,
                                                   metrics_mode="teacher-forced", progress=False)
    loss = eval_loss(model, examples, tiny_tokenizer.pad_token_id, progress=False)
    assert metrics["eval_loss"] == pytest.approx(loss["eval_loss"])
    assert metrics["perplexity"] == pytest.approx(math.exp(loss["eval_loss"]))
    texts = [p["prediction"] for p in predictions]
    text_metrics = compute_text_metrics(texts, references)
    for key in ("bleu", "rouge1", "rouge2", "rougeL"):
        assert metrics[key] == pytest.approx(text_metrics[key])
    assert [p["reference"] for p in predictions] == references
    assert details["eval_response_tokens"] == loss["eval_tokens"]
    assert details["metrics_mode"] == "teacher-forced"
    with pytest.raises(ValueError):
        evaluate_model(model, tiny_tokenizer, examples, references, metrics_mode="beam", progress=False)


def test_greedy_decode_matches_generate_with_a_sliding_window_cache(tiny_tokenizer, examples):
    """Gemma 3 mixes sliding-window and global layers; a window shorter than the prompts makes the
    sliding cache drop entries while rows leave the batch."""
    model = model_for("gemma", tiny_tokenizer)
    model.config.sliding_window = 4
    prompts = [e.input_ids[: e.prompt_len] for e in examples]
    eos_ids = [tiny_tokenizer.eos_token_id]
    expected = [reference_generate(model, p, 6, eos_ids) for p in prompts]
    batch = collate([examples[i].__class__(p, [-100] * len(p), len(p), False) for i, p in enumerate(prompts)],
                    tiny_tokenizer.pad_token_id, left=True)
    got = greedy_decode(model, batch["input_ids"], batch["attention_mask"], 6, eos_ids)
    assert got == expected
    assert min(len(p) for p in prompts) > 4  # the window really is shorter than every prompt


def test_preallocated_cache_holds_what_transformers_dynamic_cache_holds(tiny_tokenizer):
    """The same keys and values as ``DynamicCache`` after a prefill, decode steps and rows leaving;
    Gemma's sliding-window layers stay transformers' own."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicSlidingWindowLayer

    gemma = model_for("gemma", tiny_tokenizer)
    gemma.config.layer_types = ["sliding_attention", "full_attention"] * (gemma.config.num_hidden_layers // 2)
    kinds = [type(layer) for layer in preallocated_cache(gemma, 16).layers]
    assert PreallocatedLayer in kinds and DynamicSlidingWindowLayer in kinds
    model = model_for("llama", tiny_tokenizer)
    ours, theirs = preallocated_cache(model, 8), DynamicCache(config=model.config)
    assert all(type(layer) is PreallocatedLayer for layer in ours.layers)
    torch.manual_seed(0)
    steps = [torch.randn(4, 2, 5, 8)] + [torch.randn(4, 2, 1, 8) for _ in range(2)] + [torch.randn(2, 2, 1, 8)]
    for n, kv in enumerate(steps):
        if n == 3:
            for cache in (ours, theirs):
                cache.batch_select_indices(torch.tensor([0, 3]))
        got = ours.update(kv, -kv, layer_idx=0)
        want = theirs.update(kv, -kv, layer_idx=0)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        assert ours.get_seq_length() == theirs.get_seq_length() == 5 + n
    with pytest.raises(ValueError, match="holds 8 positions"):
        ours.update(steps[-1], steps[-1], layer_idx=0)
