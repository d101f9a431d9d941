"""Greedy answers to eval prompts: batched, left-padded, with the KV cache.

Greedy outputs do not depend on how prompts are batched when the model runs in fp32 (see
``training.runtime.merged_for_eval``); the tests compare them with ``model.generate`` one prompt at a time.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from oloraplus.data.batching import IGNORE, collate, length_sorted_batches
from oloraplus.data.tokenize import Example


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
    eos_ids = stop_token_ids(model, tokenizer)
    fake = [Example(p, [IGNORE] * len(p), len(p), False) for p in prompts]
    outputs: list[str] = [""] * len(prompts)
    new_tokens = 0
    for idx in tqdm(length_sorted_batches(fake, batch_size), desc="generate", disable=not progress):
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
    Alpaca's spread of response lengths much of the decoding work goes to padding (bench/NOTES.md).
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


def stop_token_ids(model, tokenizer) -> list[int]:
    ids = {tokenizer.eos_token_id}
    configured = getattr(model.generation_config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(configured)
    return sorted(i for i in ids if i is not None)


def until_eos(tokens: list[int], eos_ids: list[int]) -> list[int]:
    for n, t in enumerate(tokens):
        if t in eos_ids:
            return tokens[: n + 1]
    return tokens

