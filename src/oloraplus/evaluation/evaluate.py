"""Evaluation: eval loss on response tokens, generated and teacher-forced predictions.

Three things make this fast without changing what is measured:
- with ``fast=True`` (the speed patches of ``oloraplus.fast``) the LM head runs only where a
  response token is predicted (``logits_to_keep`` with a boolean mask): prompt and pad positions
  never reach the vocabulary projection, which is the largest single cost for Gemma's
  262k-token vocabulary; ``fast=False`` computes every position's logits and selects those rows;
- batches are sorted by length, so there is little padding;
- generation is batched, left-padded, greedy, with the KV cache, and stops when every
  sequence in the batch has produced EOS;
- teacher-forced predictions (the argmax at each response position) come from the logits the
  final eval loss computes anyway (:func:`batch_losses`), not from a second forward.

Besides the response-only ``eval_loss`` (the training objective on held-out records),
:func:`eval_loss` can report per-example sums and the whole-sequence cross-entropy (every
predicted token of prompt + response, what a model's own ``labels=input_ids`` loss averages):
see :func:`batch_losses`. That puts the LM head at every non-pad position (in the same forward
as the response loss where the path allows it), so it is asked for (``per_example=True``) by the
final evaluation only, not by the validation loss during training.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from oloraplus.data.batching import IGNORE, collate, length_sorted_batches
from oloraplus.data.tokenize import Example
from oloraplus.evaluation.generation import generate_responses
from oloraplus.evaluation.metrics import compute_text_metrics
from oloraplus.fast.head_loss import fusable_head, head_cross_entropy, head_inputs
from oloraplus.fast.logits_mask import kept_logits
from oloraplus.method.loss import response_loss, response_positions
from oloraplus.models.loading import base_model

# Logit rows per cross-entropy call in :func:`batch_losses` (bounds the logits held at once).
CE_CHUNK_ROWS = 1024

# The per-example lists :func:`eval_loss` returns with ``per_example=True``, in ``examples`` order.
EXAMPLE_LOSS_KEYS = ("response_loss_sum", "response_tokens", "sequence_loss_sum", "sequence_tokens")


@torch.no_grad()
def eval_loss(model, examples: list[Example], pad_id: int, batch_size: int = 8, progress: bool = True,
              fast: bool = True, per_example: bool = False, predict: bool = False) -> dict:
    """Mean cross-entropy over all response tokens of ``examples`` (token-weighted).

    Returns ``{"eval_loss", "eval_tokens"}``. ``fast`` chooses the path of
    ``method.loss.response_loss`` (the same loss either way).

    ``per_example=True`` adds (:func:`batch_losses`; the ``eval_loss`` value is computed exactly,
    bit for bit, as without it):
    ``response_loss_sum``, ``response_tokens``, ``sequence_loss_sum``, ``sequence_tokens``: lists
    aligned with ``examples``, the summed cross-entropy (fp32 per token, summed in fp64) and the
    token count over the response tokens, and over every predicted token of the whole sequence
    (prompt + response: each token after the first); ``eval_loss_sequence`` (sum / count of the
    latter, token-weighted) and ``eval_sequence_tokens``. ``sum(response_loss_sum) /
    sum(response_tokens)`` equals ``eval_loss`` to float rounding, and ``sum(response_tokens)``
    equals ``eval_tokens``.

    ``predict=True`` (with ``per_example``) adds ``predicted_ids``: per example, the argmax token at
    each position that predicts a response token (teacher forcing), from the same logits as the
    losses: the teacher-forced predictions cost no second forward.
    """
    if predict and not per_example:
        raise ValueError("predict=True needs per_example=True (the predictions come from its logits)")
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    per: dict[str, list] = {k: [0] * len(examples) for k in EXAMPLE_LOSS_KEYS + (("predicted_ids",) if predict else ())}
    for idx in tqdm(length_sorted_batches(examples, batch_size), desc="eval loss", disable=not progress):
        batch = {k: v.to(device) for k, v in collate([examples[i] for i in idx], pad_id).items()}
        if per_example:
            batch_total, rows = batch_losses(model, **batch, fast=fast, predict=predict)
            for key, values in rows.items():
                for i, value in zip(idx, values):
                    per[key][i] = value
        else:
            batch_total = response_loss(model, **batch, reduction="sum", fast=fast)
        total += batch_total.item()
        count += int((batch["labels"][:, 1:] != IGNORE).sum())
    result = {"eval_loss": total / count, "eval_tokens": count}
    if per_example:
        seq_tokens = sum(per["sequence_tokens"])
        result.update(per, eval_loss_sequence=sum(per["sequence_loss_sum"]) / seq_tokens,
                      eval_sequence_tokens=seq_tokens)
    return result


def batch_losses(model, input_ids, attention_mask, labels, fast: bool = True,
                 predict: bool = False) -> tuple[torch.Tensor, dict]:
    """The summed response loss of a right-padded batch, and per row the response and whole-sequence sums.

    Returns ``(total, rows)``: ``total`` is ``method.loss.response_loss(..., reduction="sum")``
    bit for bit; ``rows`` maps :data:`EXAMPLE_LOSS_KEYS` to python lists, one entry per row: the
    summed cross-entropy (fp32 per token, summed in fp64) and the token count over the response
    tokens (``labels`` not -100) and over the whole sequence, every token after the first that is
    not padding (``attention_mask``), each predicted from the tokens before it: the loss a causal
    LM computes itself from ``labels=input_ids`` with the pads set to -100. ``predict=True`` adds
    ``predicted_ids``: per row, the argmax of the logits at its response-predicting positions (the
    rows' teacher-forced predictions), taken from the same logit chunks as the losses.

    One forward where the path allows it: ``fast`` with a fusable head (``fast.head_loss``) runs
    the model with every predicting position as ``logits_to_keep``, captures the head's input and
    computes ``total`` from its response rows as ``response_loss`` does (the same rows, in the same
    order, the same fused chunks); ``fast=False`` takes every position's logits once. Otherwise
    (``fast`` with a head that cannot be fused) ``total`` comes from ``response_loss`` and the rows
    from a second forward.
    """
    seq_keep = attention_mask[:, 1:] != 0  # position t predicts token t+1, which is real
    seq_keep = torch.cat([seq_keep, torch.zeros_like(seq_keep[:, :1])], dim=1)
    seq_targets = input_ids[:, 1:][seq_keep[:, :-1]]
    response_keep, response_targets = response_positions(labels)
    is_response = response_keep[seq_keep]
    if int(is_response.sum()) != int(response_keep.sum()):
        raise ValueError("a response token is predicted from or lies on a padding position")
    head = fusable_head(model) if fast else None
    if head is not None:
        with head_inputs(head) as captured:
            model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=seq_keep, use_cache=False)
        hidden = captured[-1]
        if hidden.dim() == 3:  # a model that ignores a boolean logits_to_keep
            hidden = hidden[seq_keep]
        total = head_cross_entropy(model, head, hidden[is_response], response_targets, "sum")
        softcap = getattr(base_model(model).config, "final_logit_softcapping", None)

        def logits_of(i: int) -> torch.Tensor:
            logits = F.linear(hidden[i : i + CE_CHUNK_ROWS].to(head.weight.dtype), head.weight).float()
            return logits if softcap is None else torch.tanh(logits / softcap) * softcap
    else:
        if fast:
            total = response_loss(model, input_ids, attention_mask, labels, reduction="sum", fast=True)
            logits = kept_logits(model, input_ids, attention_mask, seq_keep)
        else:  # as method.loss.response_loss(fast=False): every position's logits, the response rows selected
            every = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
            total = F.cross_entropy(every[response_keep].float(), response_targets, reduction="sum")
            logits = every[seq_keep]

        def logits_of(i: int) -> torch.Tensor:
            return logits[i : i + CE_CHUNK_ROWS].float()

    chunks, argmax = [], []
    for i in range(0, len(seq_targets), CE_CHUNK_ROWS):
        chunk = logits_of(i)  # not named logits: logits_of reads that name on the unfused paths
        chunks.append(F.cross_entropy(chunk, seq_targets[i : i + CE_CHUNK_ROWS], reduction="none"))
        if predict:
            argmax.append(chunk.argmax(-1))
    losses, seq_keep, is_response = torch.cat(chunks).cpu().double(), seq_keep.cpu(), is_response.cpu()  # fp64: not on MPS
    row_of = torch.arange(input_ids.shape[0])[:, None].expand_as(seq_keep)[seq_keep]
    zeros = torch.zeros(input_ids.shape[0], dtype=torch.float64)
    rows = {
        "response_loss_sum": zeros.index_add(0, row_of[is_response], losses[is_response]).tolist(),
        "response_tokens": response_keep.sum(1).tolist(),
        "sequence_loss_sum": zeros.index_add(0, row_of, losses).tolist(),
        "sequence_tokens": seq_keep.sum(1).tolist(),
    }
    if predict:  # row-major like response_keep, so each row's response positions are one run, in order
        predicted = torch.cat(argmax).cpu()[is_response]
        rows["predicted_ids"] = [ids.tolist() for ids in torch.split(predicted, rows["response_tokens"])]
    return total, rows


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
    """Eval loss (response-only and whole-sequence) plus BLEU/ROUGE in the chosen mode.

    ``fast``: see :func:`eval_loss`. Returns ``(metrics, predictions, details)``; ``predictions``
    holds one dict per example with the prompt, the reference and the prediction. ``details``
    describes the evaluation; its ``"example_losses"`` holds the per-example lists of
    :func:`eval_loss` (``per_example=True``, keys :data:`EXAMPLE_LOSS_KEYS`, in ``examples``
    order), numbers only, for the caller to write or drop.
    """
    if metrics_mode not in METRIC_MODES:
        raise ValueError(f"unknown metrics mode {metrics_mode!r}")
    teacher_forced = metrics_mode == "teacher-forced"
    t0 = time.perf_counter()
    loss = eval_loss(model, examples, tokenizer.pad_token_id, batch_size, progress, fast=fast, per_example=True,
                     predict=teacher_forced)
    t1 = time.perf_counter()
    if teacher_forced:  # the argmax at each response position, from the eval loss's own logits
        texts = [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in loss["predicted_ids"]]
        new_tokens = 0
    else:
        prompts = [e.input_ids[: e.prompt_len] for e in examples]
        texts, new_tokens = generate_responses(
            model, tokenizer, prompts, max_new_tokens, generation_batch_size, progress
        )
    t2 = time.perf_counter()
    text_metrics = compute_text_metrics(texts, references)
    metrics = {
        "eval_loss": loss["eval_loss"],
        "eval_loss_sequence": loss["eval_loss_sequence"],
        "perplexity": math.exp(loss["eval_loss"]),
        **{k: text_metrics[k] for k in ("bleu", "rouge1", "rouge2", "rougeL")},
    }
    details = {
        "metrics_mode": metrics_mode,
        "bleu_signature": text_metrics["bleu_signature"],
        "eval_response_tokens": loss["eval_tokens"],
        "eval_loss_sequence": (f"mean cross-entropy (nats/token) over all {loss['eval_sequence_tokens']} predicted "
                               "tokens of prompt + response (every non-pad token after the first, as the model's own "
                               "labels=input_ids loss); eval_loss covers the response tokens only"),
        "eval_sequence_tokens": loss["eval_sequence_tokens"],
        "generated_tokens": new_tokens,
        "eval_loss_seconds": t1 - t0,
        "predict_seconds": t2 - t1,
        "example_losses": {k: loss[k] for k in EXAMPLE_LOSS_KEYS},
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
