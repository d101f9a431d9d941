"""Probe: Llama's RMSNorm as one autograd function with a hand-written backward (the weight is frozen).

Whole SmolLM2 training steps (8 real batches, 3 repeats), transformers' RMSNorm and the hand-written
one alternated batch by batch in one process (bench/NOTES.md, 2026-11-29). The hand-written forward
takes the same steps as transformers' (fp32 statistics, rounded once, then the weight); its backward
is dx = rstd * (g - xhat * mean(g * xhat)) with g = dy * w, and saves the bf16 input instead of
fp32 intermediates. Run from the repo root: .venv/bin/python -m bench.rmsnorm_probe
"""
import time

import torch
from transformers.models.llama import modeling_llama

from bench.probe_setup import forward_backward, training_model_and_batches

torch.set_num_threads(2)


class FrozenRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        xf = x.float()
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return weight * (xf * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        g = (dy * weight).float()
        xhat = x.float() * rstd
        dx = rstd * (g - xhat * (g * xhat).mean(-1, keepdim=True))
        return dx.to(x.dtype), None, None


original = modeling_llama.LlamaRMSNorm.forward


def hand_written(self, hidden_states):
    return FrozenRMSNorm.apply(hidden_states, self.weight, self.variance_epsilon)


model, batches = training_model_and_batches()
forward_backward(model, batches[0])
model.zero_grad(set_to_none=True)
times = {"transformers": 0.0, "hand-written": 0.0}
losses = {}
for _ in range(3):
    for i, batch in enumerate(batches):
        for name, fn in (("transformers", original), ("hand-written", hand_written)):
            modeling_llama.LlamaRMSNorm.forward = fn
            t = time.perf_counter()
            losses[name, i] = forward_backward(model, batch)
            model.zero_grad(set_to_none=True)
            times[name] += time.perf_counter() - t
modeling_llama.LlamaRMSNorm.forward = original
print({k: f"{v:.2f} s" for k, v in times.items()}, f"transformers / hand-written {times['transformers'] / times['hand-written']:.3f}")
print("largest loss difference", max(abs(losses["transformers", i] - losses["hand-written", i]) for i in range(len(batches))))
