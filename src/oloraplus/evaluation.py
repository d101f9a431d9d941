"""Evaluation: eval loss on response tokens, generated and teacher-forced predictions.

Three things make this fast without changing what is measured:
- the LM head runs only where a response token is predicted (``logits_to_keep`` with a
  boolean mask): prompt and pad positions never reach the vocabulary projection, which is the
  largest single cost for Gemma's 262k-token vocabulary;
- batches are sorted by length, so there is little padding;
- generation is batched, left-padded, greedy, with the KV cache, and stops when every
  sequence in the batch has produced EOS.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data import Example
from .loss import fusable_head, head_cross_entropy, head_inputs
from .metrics import compute_text_metrics

IGNORE = -100


def collate(examples: list[Example], pad_id: int, left: bool = False) -> dict[str, torch.Tensor]:
    """Pad a batch to its longest example (right padding, or left for generation)."""
    width = max(len(e.input_ids) for e in examples)
    ids, labels, mask = [], [], []
    for e in examples:
        pad = width - len(e.input_ids)
        if left:
            ids.append([pad_id] * pad + e.input_ids)
            labels.append([IGNORE] * pad + e.labels)
            mask.append([0] * pad + [1] * len(e.input_ids))
        else:
            ids.append(e.input_ids + [pad_id] * pad)
            labels.append(e.labels + [IGNORE] * pad)
            mask.append([1] * len(e.input_ids) + [0] * pad)
    return {
        "input_ids": torch.tensor(ids),
        "labels": torch.tensor(labels),
        "attention_mask": torch.tensor(mask),
    }


def _response_positions(labels) -> tuple[torch.Tensor, torch.Tensor]:
    """The positions that predict a response token (position t predicts token t+1), and those tokens."""
    keep = labels[:, 1:] != IGNORE
    keep = torch.cat([keep, torch.zeros_like(keep[:, :1])], dim=1)
    return keep, labels[:, 1:][keep[:, :-1]]


def response_logits(model, input_ids, attention_mask, labels) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits at the positions that predict a response token, and those tokens.

    Returns ``(logits, targets)`` of shapes (N, vocab) and (N,), N = number of response tokens.
    """
    keep, targets = _response_positions(labels)
    out = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep, use_cache=False)
    logits = out.logits
    if logits.dim() == 3:  # a model that ignores a boolean logits_to_keep
        logits = logits[keep]
    return logits, targets


def response_loss(model, input_ids, attention_mask, labels, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy (fp32) over response tokens only.

    Where the model's head allows it (``loss.fusable_head``), the head and the loss run fused,
    chunk by chunk (``loss.HeadCrossEntropy``): the same loss, without materialising the logits.
    """
    head = fusable_head(model)
    if head is None:
        logits, targets = response_logits(model, input_ids, attention_mask, labels)
        return F.cross_entropy(logits.float(), targets, reduction=reduction)
    keep, targets = _response_positions(labels)
    with head_inputs(head) as captured:
        model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep, use_cache=False)
    hidden = captured[-1]
    if hidden.dim() == 3:  # a model that ignores a boolean logits_to_keep
        hidden = hidden[keep]
    return head_cross_entropy(model, head, hidden, targets, reduction)


def _length_sorted_batches(examples: list[Example], batch_size: int, key=None) -> list[list[int]]:
    key = key or (lambda e: len(e.input_ids))
    order = sorted(range(len(examples)), key=lambda i: key(examples[i]))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


@torch.no_grad()
def eval_loss(model, examples: list[Example], pad_id: int, batch_size: int = 8, progress: bool = True) -> dict:
    """Mean cross-entropy over all response tokens of ``examples`` (token-weighted)."""
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for idx in tqdm(_length_sorted_batches(examples, batch_size), desc="eval loss", disable=not progress):
        batch = {k: v.to(device) for k, v in collate([examples[i] for i in idx], pad_id).items()}
        total += response_loss(model, **batch, reduction="sum").item()
        count += int((batch["labels"][:, 1:] != IGNORE).sum())
    return {"eval_loss": total / count, "eval_tokens": count}


@torch.no_grad()
def generate_responses(
    model,
    tokenizer,
    prompts: list[list[int]],
    max_new_tokens: int = 128,
    batch_size: int = 16,
    progress: bool = True,
) -> tuple[list[str], int]:
    """Greedy responses for tokenised prompts, batched and left-padded.

    Returns the decoded new text per prompt (special tokens skipped) and the number of new
    tokens generated (up to and including EOS).
    """
    model.eval()
    device = next(model.parameters()).device
    eos_ids = _eos_ids(model, tokenizer)
    fake = [Example(p, [IGNORE] * len(p), len(p), False) for p in prompts]
    outputs: list[str] = [""] * len(prompts)
    new_tokens = 0
    for idx in tqdm(_length_sorted_batches(fake, batch_size), desc="generate", disable=not progress):
        batch = collate([fake[i] for i in idx], tokenizer.pad_token_id, left=True)
        generated = greedy_decode(
            model, batch["input_ids"].to(device), batch["attention_mask"].to(device), max_new_tokens, eos_ids
        )
        for tokens, i in zip(generated, idx):
            new_tokens += len(tokens)
            outputs[i] = tokenizer.decode(tokens, skip_special_tokens=True).strip()
    return outputs, new_tokens


@torch.no_grad()
def greedy_decode(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int, eos_ids: list[int]
) -> list[list[int]]:
    """Greedy decoding of a left-padded batch that drops each row (and its KV cache) once it ends.

    ``model.generate`` keeps finished rows in the batch until the longest one ends; with
    Alpaca's spread of response lengths that is 40% of the decoding work spent on padding.
    Returns the new tokens per row, up to and including the first EOS.
    """
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    rows = torch.arange(input_ids.shape[0])
    new: list[list[int]] = [[] for _ in range(input_ids.shape[0])]
    eos = torch.tensor(eos_ids, device=input_ids.device)
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    step_ids = input_ids
    for step in range(max_new_tokens):
        logits = model(
            input_ids=step_ids,
            attention_mask=attention_mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        ).logits[:, -1]
        token = logits.argmax(-1)
        for row, t in zip(rows.tolist(), token.tolist()):
            new[row].append(t)
        done = torch.isin(token, eos)
        if step == max_new_tokens - 1 or bool(done.all()):
            break
        if bool(done.any()):
            keep = (~done).nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            rows, token, attention_mask, positions = rows[keep.cpu()], token[keep], attention_mask[keep], positions[keep]
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(rows), 1)], dim=1)
        positions = positions[:, -1:] + 1
        step_ids = token[:, None]
    return new


def _eos_ids(model, tokenizer) -> list[int]:
    ids = {tokenizer.eos_token_id}
    configured = getattr(model.generation_config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(configured)
    return sorted(i for i in ids if i is not None)


def _until_eos(tokens: list[int], eos_ids: list[int]) -> list[int]:
    for n, t in enumerate(tokens):
        if t in eos_ids:
            return tokens[: n + 1]
    return tokens


@torch.no_grad()
def teacher_forced_responses(
    model, tokenizer, examples: list[Example], batch_size: int = 8, progress: bool = True
) -> list[str]:
    """Argmax next-token predictions at the reference response's positions, decoded."""
    model.eval()
    device = next(model.parameters()).device
    outputs: list[str] = [""] * len(examples)
    for idx in tqdm(_length_sorted_batches(examples, batch_size), desc="teacher-forced", disable=not progress):
        batch = {k: v.to(device) for k, v in collate([examples[i] for i in idx], tokenizer.pad_token_id).items()}
        logits, _ = response_logits(model, **batch)
        predicted = logits.argmax(-1).cpu()
        counts = (batch["labels"][:, 1:] != IGNORE).sum(1).tolist()
        start = 0
        for i, n in zip(idx, counts):
            outputs[i] = tokenizer.decode(predicted[start : start + n].tolist(), skip_special_tokens=True).strip()
            start += n
    return outputs


METRIC_MODES = ("generation", "teacher-forced")


def evaluate_model(
    model,
    tokenizer,
    examples: list[Example],
    references: list[str],
    metrics_mode: str = "generation",
    max_new_tokens: int = 128,
    batch_size: int = 8,
    generation_batch_size: int = 16,
    progress: bool = True,
) -> tuple[dict, list[dict], dict]:
    """Eval loss plus BLEU/ROUGE in the chosen mode.

    Returns ``(metrics, predictions, timings)``; ``predictions`` holds one dict per example
    with the prompt, the reference and the prediction.
    """
    t0 = time.perf_counter()
    loss = eval_loss(model, examples, tokenizer.pad_token_id, batch_size, progress)
    t1 = time.perf_counter()
    if metrics_mode == "generation":
        prompts = [e.input_ids[: e.prompt_len] for e in examples]
        texts, new_tokens = generate_responses(
            model, tokenizer, prompts, max_new_tokens, generation_batch_size, progress
        )
    elif metrics_mode == "teacher-forced":
        texts, new_tokens = teacher_forced_responses(model, tokenizer, examples, batch_size, progress), 0
    else:
        raise ValueError(f"unknown metrics mode {metrics_mode!r}")
    t2 = time.perf_counter()
    text_metrics = compute_text_metrics(texts, references)
    metrics = {
        "eval_loss": loss["eval_loss"],
        "perplexity": math.exp(loss["eval_loss"]),
        **{k: text_metrics[k] for k in ("bleu", "rouge1", "rouge2", "rougeL")},
    }
    details = {
        "metrics_mode": metrics_mode,
        "bleu_signature": text_metrics["bleu_signature"],
        "eval_response_tokens": loss["eval_tokens"],
        "generated_tokens": new_tokens,
        "eval_loss_seconds": t1 - t0,
        "predict_seconds": t2 - t1,
    }
    predictions = [
        {
            "prompt": tokenizer.decode(e.input_ids[: e.prompt_len], skip_special_tokens=True),
            "reference": ref,
            "prediction": text,
        }
        for e, ref, text in zip(examples, references, texts)
    ]
    return metrics, predictions, details
