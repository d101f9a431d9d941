"""Probe: the fused LM head + cross-entropy (fast/head_loss.py) vs the plain path
(``F.cross_entropy`` over materialised fp32 logits), for one training forward + backward on CPU.

Both paths alternate on the same real length-sorted batches (bf16 autocast, frozen weights in
bf16, attention kernel per batch, as `oloraplus train` runs), 2 repeats, wall time with the
default threads; first the loss and the LoRA gradients of both on two batches.
Run from the repo root: .venv/bin/python -m bench.head_loss_probe [smollm2-135m|gemma3-270m]
"""
import sys
import time

import torch

import oloraplus.method.loss as loss_module  # looks fusable_head up here: the switch below
from bench.harness import BenchConfig, split_examples
from oloraplus.data.batching import collate
from oloraplus.fast.attention import attention_kernel, use_attention
from oloraplus.fast.head_loss import fusable_head
from oloraplus.fast.precision import prepare_for_compute
from oloraplus.method.adapters import apply_olora
from oloraplus.method.loss import response_loss
from oloraplus.models.loading import load_model
from oloraplus.training.config import TrainConfig
from oloraplus.training.runtime import autocast

name = sys.argv[1] if len(sys.argv) > 1 else "smollm2-135m"
cfg = BenchConfig(model=name, n_train=128, n_eval=8)
tc = TrainConfig(output="unused", model=cfg.model, data=cfg.data, method="olora-plus", ratio=0.25)
model, tok = load_model(cfg.model)
_, train, _ = split_examples(cfg, tok)
model = apply_olora(model, tc.adapter_config())
prepare_for_compute(model, "bf16", "cpu")
model.train()
ex = sorted(train, key=lambda e: len(e.input_ids))
batches = [collate(ex[i : i + 8], tok.pad_token_id) for i in (16, 48, 80, 112)]
lora = [p for p in model.parameters() if p.requires_grad]


def step(batch, fused: bool):
    loss_module.fusable_head = fusable_head if fused else (lambda m: None)
    use_attention(model, attention_kernel("auto", "cpu", batch["input_ids"].shape[1]))
    t = time.perf_counter()
    with autocast("bf16", "cpu"):
        loss = response_loss(model, **batch)
    loss.backward()
    seconds = time.perf_counter() - t
    grads = torch.cat([p.grad.flatten().float() for p in lora])
    model.zero_grad(set_to_none=True)
    return seconds, loss.item(), grads


for b in batches[:2]:
    _, plain_loss, plain = step(b, False)
    _, fused_loss, fused = step(b, True)
    print(f"loss plain {plain_loss:.5f} fused {fused_loss:.5f}; LoRA gradients apart "
          f"{((fused - plain).norm() / plain.norm()).item():.2e} (relative)", flush=True)
times = {False: 0.0, True: 0.0}
for _ in range(2):
    for b in batches:
        for fused in times:
            times[fused] += step(b, fused)[0]
print(f"{name}: padded lengths {[b['input_ids'].shape[1] for b in batches]}, "
      f"response tokens {[int((b['labels'] != -100).sum()) for b in batches]}")
print(f"plain {times[False]:.2f} s, fused {times[True]:.2f} s, speed-up {times[False] / times[True]:.3f}")
