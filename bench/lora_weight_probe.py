"""Probe: LoRA's down-projection A fused into the base matmul, for one projection on CPU.

PEFT-style ``x W^T + s (x A^T) B^T`` under bf16 autocast against one custom autograd function
that multiplies by ``[W; A]`` once (forward) and by ``[dY, dU] [W; A]`` once (input gradient).
SmolLM2's projection shapes at 800 tokens (a batch of 8 x 100), forward + backward, best of 3
blocks of 30 alternated; also the output and gradient difference of the two.
Run from the repo root: .venv/bin/python -m bench.lora_weight_probe
"""
import time

import torch

bf = torch.bfloat16
M, r, s = 800, 32, 0.5


def peft_style(x, W, A, B):
    with torch.autocast("cpu", dtype=bf):
        return torch.nn.functional.linear(x, W) + torch.nn.functional.linear(torch.nn.functional.linear(x, A), B) * s


class Fused(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, W, A, B):
        n = W.shape[0]
        Bb = B.to(bf)
        WA = torch.cat([W, A.to(bf)])
        yf = x @ WA.t()
        u = yf[:, n:]
        ctx.save_for_backward(x, u, WA, Bb)
        return torch.addmm(yf[:, :n], u, Bb.t(), alpha=s)

    @staticmethod
    def backward(ctx, dy):
        x, u, WA, Bb = ctx.saved_tensors
        du = (dy @ Bb) * s
        dB = (dy.t() @ u) * s
        dx = torch.cat([dy, du], 1) @ WA
        return dx, None, (du.t() @ x).float(), dB.float()


torch.manual_seed(0)
for N, K in [(576, 576), (192, 576), (1536, 576), (576, 1536)]:
    x = torch.randn(M, K, dtype=bf, requires_grad=True)
    W = torch.randn(N, K, dtype=bf) * 0.03
    A = (torch.randn(r, K) * 0.03).requires_grad_()
    B = (torch.randn(N, r) * 0.03).requires_grad_()
    fns = {"peft": lambda: peft_style(x, W, A, B), "fused": lambda: Fused.apply(x, W, A, B)}
    best = {k: float("inf") for k in fns}
    for _ in range(3):
        for name, f in fns.items():
            for _ in range(3):
                f().sum().backward()
            t = time.perf_counter()
            for _ in range(30):
                y = f()
                y.backward(torch.ones_like(y))
            best[name] = min(best[name], (time.perf_counter() - t) / 30 * 1e3)
    print(f"W {N}x{K}: peft-style {best['peft']:.3f} ms, fused {best['fused']:.3f} ms, "
          f"speed-up {best['peft'] / best['fused']:.3f}")
