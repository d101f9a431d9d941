"""Probe: three ways to add the LoRA update in whole SmolLM2 training steps (bench/NOTES.md, 2026-11-29).

addmm: `AddmmLoRA` as shipped, `addmm(result, h, B^T, alpha=s)`; inplace: `result.addmm_(...)`; fold: the
up-projection folded into the base matmul along K, `[x, h] @ [W, sB]^T`, one autograd function whose
backward gives dx and dh from one matmul. Forward + backward of 8 real length-sorted batches, the three
alternated on each batch, 3 repeats, wall time, 2 threads. Run from the repo root on a quiet machine:
    .venv/bin/python -m bench.lora_forward_probe
"""
import time

import torch
from peft.tuners.lora.layer import Linear as LoraLinear

from bench.probe_setup import forward_backward, training_model_and_batches  # noqa: E402
from oloraplus.fast.addmm import AddmmLoRA  # noqa: E402

model, batches = training_model_and_batches()


def inplace(module, active_adapter, x, result, **kwargs):
    h = module.lora_A[active_adapter](module.lora_dropout[active_adapter](x))
    flat = result.view(-1, result.shape[-1])
    flat.addmm_(h.reshape(-1, h.shape[-1]), module.lora_B[active_adapter].weight.t().to(flat.dtype),
                alpha=module.scaling[active_adapter])
    return result


class FoldedLoRA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, h, weight, lora_b, scale):
        wb = torch.cat([weight, (lora_b * scale).to(weight.dtype)], dim=1)
        ctx.save_for_backward(wb, h)
        ctx.scale, ctx.n_in = scale, weight.shape[1]
        return torch.cat([x.to(weight.dtype), h.to(weight.dtype)], dim=1) @ wb.t()

    @staticmethod
    def backward(ctx, dout):
        wb, h = ctx.saved_tensors
        dxh = dout @ wb
        d_lora_b = (dout.t() @ h.to(dout.dtype)).float() * ctx.scale
        return dxh[:, : ctx.n_in], dxh[:, ctx.n_in :], None, d_lora_b, None


MODE = {"now": "addmm"}
addmm_forward, lora_forward = AddmmLoRA.forward, LoraLinear.forward


def forward(self, x, *args, **kwargs):
    if MODE["now"] != "fold":
        return lora_forward(self, x, *args, **kwargs)
    adapter, base = self.active_adapters[0], self.get_base_layer()
    with torch.autocast("cpu", enabled=False):
        x2 = x.to(torch.bfloat16).reshape(-1, x.shape[-1])
        h = x2 @ self.lora_A[adapter].weight.to(torch.bfloat16).t()
        out = FoldedLoRA.apply(x2, h, base.weight, self.lora_B[adapter].weight, self.scaling[adapter])
        if base.bias is not None:
            out = out + base.bias
    return out.view(*x.shape[:-1], out.shape[-1])


LoraLinear.forward = forward


def step(batch, mode):
    MODE["now"] = mode
    AddmmLoRA.forward = staticmethod(inplace if mode == "inplace" else addmm_forward)
    t = time.perf_counter()
    loss = forward_backward(model, batch)
    grads = [p.grad.clone() for p in model.parameters() if p.requires_grad][:4]
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - t, loss, grads


MODES = ["addmm", "inplace", "fold"]
for batch in batches[:2]:  # warm-up, and how far apart the three are
    runs = {m: step(batch, m) for m in MODES}
    for m in MODES[1:]:
        rel = [round(((a - b).norm() / a.norm()).item(), 4) for a, b in zip(runs["addmm"][2], runs[m][2])]
        print(f"{m}: loss {runs[m][1]:.5f} vs {runs['addmm'][1]:.5f}, gradient rel. diff {rel}", flush=True)
seconds = {m: 0.0 for m in MODES}
for rep in range(3):
    for batch in batches:
        for m in MODES:
            seconds[m] += step(batch, m)[0]
    print(rep, {m: round(s, 2) for m, s in seconds.items()}, flush=True)
print("time addmm / other:", {m: round(seconds["addmm"] / seconds[m], 3) for m in MODES[1:]})
