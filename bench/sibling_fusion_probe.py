"""Probe: q/k/v (and gate/up) projections with LoRA fused into one matmul vs separate, one SmolLM2 layer.

Three forms alternated: separate (as trained), fused (base weights and LoRA A's of the group each as one
matmul) and fused_a (only the group's LoRA A's as one matmul, each base weight on its own).

bf16 tensors with autograd, forward + backward, median of 30, alternated (bench/NOTES.md, 2026-11-29).
Run from the repo root: .venv/bin/python -m bench.sibling_fusion_probe
"""
import time

import torch

torch.manual_seed(0)
torch.set_num_threads(2)
bf = torch.bfloat16
d, r, s = 576, 32, 0.5
def mk(o): return torch.randn(o, d, dtype=bf)*0.02
def lora(o):
    A = (torch.randn(r, d)*0.02).requires_grad_(); B = (torch.randn(o, r)*0.02).requires_grad_(); return A, B
groups = {"qkv": [576,192,192], "gateup": [1536,1536]}
def sep(x, Ws, LRs):
    outs = []
    for W, (A, B) in zip(Ws, LRs):
        h = x @ A.to(bf).t()
        outs.append(torch.addmm(x @ W.t(), h, B.to(bf).t(), alpha=s))
    return outs
def fused(x, Wcat, Ws, LRs):
    base = x @ Wcat.t()
    Acat = torch.cat([A for A, _ in LRs]).to(bf)
    H = x @ Acat.t()
    outs = []; o0 = 0
    for i, (W, (A, B)) in enumerate(zip(Ws, LRs)):
        o = W.shape[0]
        outs.append(torch.addmm(base[:, o0:o0+o], H[:, i*r:(i+1)*r], B.to(bf).t(), alpha=s)); o0 += o
    return outs
def fused_a(x, Ws, LRs):
    H = x @ torch.cat([A for A, _ in LRs]).to(bf).t()
    return [torch.addmm(x @ W.t(), h, B.to(bf).t(), alpha=s) for W, (A, B), h in zip(Ws, LRs, H.split(r, -1))]
for N in (500, 1000, 1500):
    x0 = torch.randn(N, d, dtype=bf)
    res = {}
    for g, outs_ in groups.items():
        Ws = [mk(o) for o in outs_]; Wcat = torch.cat(Ws); LRs = [lora(o) for o in outs_]
        gs = [torch.randn(N, o, dtype=bf) for o in outs_]
        def run(f):
            x = x0.clone().requires_grad_()
            outs = f(x)
            torch.autograd.backward(outs, gs)
        fs = {"sep": lambda x: sep(x, Ws, LRs), "fused": lambda x: fused(x, Wcat, Ws, LRs),
              "fused_a": lambda x: fused_a(x, Ws, LRs)}
        t = {k: [] for k in fs}
        for rep in range(30):
            for k, f in fs.items():
                t0 = time.perf_counter(); run(f); t[k].append(time.perf_counter()-t0)
        med = {k: sorted(v)[len(v)//2]*1e3 for k, v in t.items()}
        print(N, g, {k: round(v, 2) for k, v in med.items()}, "ratios", round(med["sep"]/med["fused"], 3), round(med["sep"]/med["fused_a"], 3))
