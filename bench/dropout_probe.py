"""Probe: LoRA dropout 0.05 through fast/dropout.py (`dropout_lora_a`) vs PEFT's `nn.Dropout`, against
dropout 0, for whole SmolLM2 training steps (forward + backward, bf16 autocast, the fast path).

Single thread, thread CPU time (the machine is shared), the three variants alternated step by step
on the real length-sorted batches of `bench/probe_setup.py`, each batch stepped once untimed first
(new shapes build oneDNN primitives), the order of the variants rotated from batch to batch. PEFT's
path is the fast path as it was before fast/dropout.py: `AddmmLoRA` calling PEFT's dropout module.
Prints the summed times, the ratios to dropout 0 and the mean losses (bench/NOTES.md has the
numbers). Run from the repo root: .venv/bin/python -m bench.dropout_probe [rounds]
"""
import sys
import time

import torch

torch.set_num_threads(1)
from peft.tuners.lora.layer import Linear as LoraLinear

import oloraplus.fast.addmm as fast_addmm
from bench.probe_setup import forward_backward, training_model_and_batches

P = 0.05
rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 2
model, batches = training_model_and_batches()
layers = [m for m in model.modules() if isinstance(m, LoraLinear)]
print("lengths", [b["input_ids"].shape[1] for b in batches], "LoRA layers", len(layers), flush=True)
ours = fast_addmm._dropped_lora_a


def peft_dropout(*args):
    return None  # AddmmLoRA falls back to PEFT's own dropout module


def use(variant: str) -> None:
    fast_addmm._dropped_lora_a = peft_dropout if variant == "peft 0.05" else ours
    for layer in layers:
        layer.lora_dropout["default"] = torch.nn.Identity() if variant == "dropout 0" else torch.nn.Dropout(P)
    model.train()


def step(variant: str, batch) -> tuple[float, float]:
    use(variant)
    t = time.thread_time()
    loss = forward_backward(model, batch)
    seconds = time.thread_time() - t
    model.zero_grad(set_to_none=True)
    return seconds, loss


variants = ["dropout 0", "peft 0.05", "ours 0.05"]
for b in batches:
    step("dropout 0", b)
times = {v: [] for v in variants}
losses = {v: [] for v in variants}
for r in range(rounds):
    for i, b in enumerate(batches):
        k = (i + r) % len(variants)
        for v in variants[k:] + variants[:k]:
            seconds, loss = step(v, b)
            times[v].append(seconds)
            losses[v].append(loss)
    print(f"round {r + 1}: " + ", ".join(f"{v} {sum(times[v]):.1f} s" for v in variants), flush=True)
base = sum(times["dropout 0"])
for v in variants:
    per_batch = sorted(a / b for a, b in zip(times[v], times["dropout 0"]))
    print(f"{v}: {sum(times[v]):.1f} s, ratio to dropout 0 {sum(times[v]) / base:.3f} "
          f"(per step median {per_batch[len(per_batch) // 2]:.3f}), mean loss {sum(losses[v]) / len(losses[v]):.4f}")
