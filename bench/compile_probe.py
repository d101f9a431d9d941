"""Probe: torch.compile (inductor, dynamic shapes) vs eager for one training step on CPU.

Single thread, thread CPU time, the two variants alternated on the same real batches
(bench/NOTES.md has the numbers). Run from the repo root: .venv/bin/python -m bench.compile_probe
"""
import time

import torch

torch.set_num_threads(1)
from bench.harness import BenchConfig, split_examples
from bench.probe_setup import forward_backward  # noqa: E402
from oloraplus.data.batching import collate
from oloraplus.fast.attention import use_attention
from oloraplus.fast.precision import prepare_for_compute
from oloraplus.method.adapters import apply_olora
from oloraplus.models.loading import load_model
from oloraplus.training.config import TrainConfig

cfg = BenchConfig(model="smollm2-135m", data="../shared/data/alpaca/alpaca_data.json", n_train=256, n_eval=8)
tc = TrainConfig(output="unused", model=cfg.model, data=cfg.data, method="olora-plus", ratio=0.25)
model, tok = load_model(cfg.model)
_, train, _ = split_examples(cfg, tok)
model = apply_olora(model, tc.adapter_config())
prepare_for_compute(model, "bf16", "cpu")
use_attention(model, "eager")
model.train()
ex = sorted(train, key=lambda e: len(e.input_ids))
batches = [collate(ex[i:i+8], tok.pad_token_id) for i in range(0, 256, 32)][:8]
print("lengths", [b["input_ids"].shape[1] for b in batches], flush=True)
compiled = torch.compile(model, dynamic=True)

def step(m, b):
    t = time.thread_time()
    forward_backward(m, b)
    model.zero_grad(set_to_none=True)
    return time.thread_time() - t

t = time.perf_counter()
for b in batches[:2]:
    step(compiled, b)
print(f"compile warm-up {time.perf_counter() - t:.1f} s wall", flush=True)
eager_t, comp_t = [], []
for rep in range(2):
    for b in batches:
        eager_t.append(step(model, b)); comp_t.append(step(compiled, b))
print(f"eager {sum(eager_t):.1f} s, compiled {sum(comp_t):.1f} s, ratio eager/compiled {sum(eager_t)/sum(comp_t):.3f}")
print("per batch", [round(e / c, 2) for e, c in zip(eager_t, comp_t)])
