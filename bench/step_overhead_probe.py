"""Probe: what a SmolLM2 training step pays beyond its arithmetic.

1. New shapes: each batch of 8 has its own length, so oneDNN builds new matmul primitives for it. One
   real batch padded by 1..8 extra tokens, each variant stepped twice: first (new shapes) vs second.
2. Fixed cost: a step on one 8-token record, where the arithmetic is nearly nothing.
3. The same per real batch of the bench split: first step at its length against the next two.
(bench/NOTES.md, 2026-11-29.) Run from the repo root: .venv/bin/python -m bench.step_overhead_probe
"""
import time

import torch

from bench.probe_setup import forward_backward, training_model_and_batches

torch.set_num_threads(2)
model, batches = training_model_and_batches()


def step(batch) -> float:
    t = time.perf_counter()
    forward_backward(model, batch)
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - t


def padded(batch, extra: int) -> dict:
    fills = {"input_ids": 0, "labels": -100, "attention_mask": 0}
    return {k: torch.cat([v, torch.full((v.shape[0], extra), fills[k], dtype=v.dtype)], 1) for k, v in batch.items()}


batch = batches[4]
step(batch), step(batch)
first, second = [], []
for extra in range(1, 9):
    variant = padded(batch, extra)
    first.append(step(variant))
    second.append(step(variant))
print(f"batch {tuple(batch['input_ids'].shape)} + 1..8 pad tokens: new shapes {sum(first) / 8:.3f} s per step, "
      f"seen shapes {sum(second) / 8:.3f} s ({sum(first) / sum(second):.3f}x)")
tiny = {k: v[:1, :8].clone() for k, v in batches[0].items()}
tiny["labels"][0, :4] = -100
for _ in range(3):
    step(tiny)
times = sorted(step(tiny) for _ in range(11))
print(f"one 8-token record: {times[5]:.3f} s per step")
# 3. The real batches, longest first (so that no step needs more memory than an earlier one), each
#    stepped three times: the first step at a length creates its primitives (oneDNN logs each as
#    create:cache_miss with ONEDNN_VERBOSE=profile_create).
for b in sorted(batches[:4] + batches[5:], key=lambda b: -b["input_ids"].shape[1]):
    first, second, third = step(b), step(b), step(b)
    print(f"{tuple(b['input_ids'].shape)}: first {first:.2f} s, then {second:.2f} s and {third:.2f} s")
