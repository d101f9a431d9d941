"""Greedy answers to eval prompts: batched, left-padded, with the KV cache.

Greedy outputs do not depend on how prompts are batched when the model runs in fp32 (see
``training.runtime.merged_for_eval``); the tests compare them with ``model.generate`` one prompt at a time.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from oloraplus.data.batching import IGNORE, collate, length_sorted_batches
from oloraplus.data.tokenize import Example


@torch.inference_mode()
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


@torch.inference_mode()
def greedy_decode(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int, eos_ids: list[int]
) -> list[list[int]]:
    """Greedy decoding of a left-padded batch that drops each row (and its KV cache) once it ends.

    ``model.generate`` keeps finished rows in the batch until the longest one ends; with
    Alpaca's spread of response lengths much of the decoding work goes to padding (bench/NOTES.md).
    Returns the new tokens per row, up to and including the first EOS.
    """
    cache = preallocated_cache(model, input_ids.shape[1] + max_new_tokens)
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


def preallocated_cache(model, capacity: int) -> DynamicCache:
    """A ``DynamicCache`` whose full-attention layers write into buffers of ``capacity`` positions.

    ``DynamicLayer`` concatenates each step's keys and values onto the whole cache, copying every
    layer's cache once per new token; :class:`PreallocatedLayer` writes the new positions in place
    and hands attention a view of the filled part: the same keys and values, so the same outputs.
    Sliding-window layers (Gemma 3) are kept as transformers builds them.
    """
    cache = DynamicCache(config=model.config)
    cache.layers = [PreallocatedLayer(capacity) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


class PreallocatedLayer(DynamicLayer):
    """A full-attention layer's cache in preallocated [batch, heads, capacity, dim] buffers.

    What :func:`greedy_decode` needs of a cache layer (update, rows leaving); cropping and beam search's
    row repeats are ``DynamicLayer``'s and would leave the buffers behind.
    """

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self._keys = key_states.new_empty(*key_states.shape[:2], self.capacity, key_states.shape[3])
        self._values = value_states.new_empty(*value_states.shape[:2], self.capacity, value_states.shape[3])
        self._fill(0)
        self.is_initialized = True

    def _fill(self, length: int) -> None:
        """``keys`` and ``values``: views of the buffers' first ``length`` positions."""
        self.keys, self.values = self._keys[:, :, :length], self._values[:, :, :length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start = self.keys.shape[-2]
        end = start + key_states.shape[-2]
        if end > self.capacity:
            raise ValueError(f"the cache holds {self.capacity} positions, {end} were asked for")
        self._keys[:, :, start:end] = key_states
        self._values[:, :, start:end] = value_states
        self._fill(end)
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            length = self.keys.shape[-2]
            self._keys, self._values = self._keys[indices], self._values[indices]
            self._fill(length)


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

