"""Probe: one optimiser step over SmolLM2-shaped LoRA tensors: AdamW for-loop vs foreach vs fused on CPU.

(bench/NOTES.md, 2026-11-29). Run: .venv/bin/python -m bench.adamw_probe
"""
import time

import torch

torch.set_num_threads(2)
torch.manual_seed(0)
shapes = []
for _ in range(30):
    for o in (576,192,192,576,1536,1536,576):
        i = 1536 if o == 576 and len(shapes) % 7 == 6 else 576
        shapes += [(32, i), (o, 32)]
def mk():
    ps = [torch.randn(s, requires_grad=True) for s in shapes]
    for p in ps: p.grad = torch.randn_like(p) * 1e-3
    return ps
res = {}
for kw in ({}, {"foreach": True}, {"fused": True}):
    ps = mk()
    opt = torch.optim.AdamW([{"params": ps[::2], "lr": 3e-4}, {"params": ps[1::2], "lr": 7.5e-5}], lr=3e-4, **kw)
    for _ in range(3): opt.step()
    ts = []
    for _ in range(20):
        t = time.perf_counter(); opt.step(); ts.append(time.perf_counter() - t)
    res[str(kw)] = ps
    print(kw, "median ms", round(sorted(ts)[10]*1e3, 2))
