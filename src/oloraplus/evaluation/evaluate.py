"""Evaluation: eval loss on response tokens, generated and teacher-forced predictions.

Three things make this fast without changing what is measured:
- with ``fast=True`` (the speed patches of ``oloraplus.fast``) the LM head runs only where a
  response token is predicted (``logits_to_keep`` with a boolean mask): prompt and pad positions
  never reach the vocabulary projection, which is the largest single cost for Gemma's
  262k-token vocabulary; ``fast=False`` computes every position's logits and selects those rows;
- batches are sorted by length, so there is little padding;
- generation is batched, left-padded, greedy, with the KV cache, and stops when every
  sequence in the batch has produced EOS.
"""

from __future__ import annotations

import math
import time

import torch
from tqdm.auto import tqdm

from oloraplus.data.batching import IGNORE, collate, length_sorted_batches
from oloraplus.data.tokenize import Example
from oloraplus.evaluation.generation import generate_responses, teacher_forced_responses
from oloraplus.evaluation.metrics import compute_text_metrics
from oloraplus.method.loss import response_loss


@torch.no_grad()
def eval_loss(model, examples: list[Example], pad_id: int, batch_size: int = 8, progress: bool = True,
              fast: bool = True) -> dict:
    """Mean cross-entropy over all response tokens of ``examples`` (token-weighted).

    ``fast`` chooses the path of ``method.loss.response_loss`` (the same loss either way).
    """
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for idx in tqdm(length_sorted_batches(examples, batch_size), desc="eval loss", disable=not progress):
        batch = {k: v.to(device) for k, v in collate([examples[i] for i in idx], pad_id).items()}
        total += response_loss(model, **batch, reduction="sum", fast=fast).item()
        count += int((batch["labels"][:, 1:] != IGNORE).sum())
    return {"eval_loss": total / count, "eval_tokens": count}


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
    fast: bool = True,
) -> tuple[dict, list[dict], dict]:
    """Eval loss plus BLEU/ROUGE in the chosen mode (``fast``: see :func:`eval_loss`).

    Returns ``(metrics, predictions, timings)``; ``predictions`` holds one dict per example
    with the prompt, the reference and the prediction.
    """
    t0 = time.perf_counter()
    loss = eval_loss(model, examples, tokenizer.pad_token_id, batch_size, progress, fast=fast)
    t1 = time.perf_counter()
    if metrics_mode == "generation":
        prompts = [e.input_ids[: e.prompt_len] for e in examples]
        texts, new_tokens = generate_responses(
            model, tokenizer, prompts, max_new_tokens, generation_batch_size, progress
        )
    elif metrics_mode == "teacher-forced":
        texts, new_tokens = teacher_forced_responses(model, tokenizer, examples, batch_size, progress, fast), 0
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
