"""Probe: the LoRA update added inside the up-projection's matmul (fast/addmm.py AddmmLoRA) vs PEFT's
``result + lora_B(lora_A(x)) * s``, for one training step (forward + backward) on CPU.

Single thread, thread CPU time, the two variants alternated on the same real length-sorted
batches (bf16 autocast, frozen weights in bf16, attention kernel per batch, as `oloraplus train`
runs); also each variant's loss and gradients against an fp32 model on two batches
(bench/NOTES.md has the numbers). Run from the repo root: .venv/bin/python -m bench.addmm_probe
"""
import time

import torch

torch.set_num_threads(1)
from peft.tuners.lora.layer import Linear as LoraLinear  # noqa: E402

from bench.harness import BenchConfig, split_examples  # noqa: E402
from oloraplus.data.batching import collate  # noqa: E402
from oloraplus.fast.addmm import AddmmLoRA  # noqa: E402
from oloraplus.fast.attention import attention_kernel, use_attention  # noqa: E402
from oloraplus.fast.precision import prepare_for_compute  # noqa: E402
from oloraplus.method.adapters import apply_olora  # noqa: E402
from oloraplus.method.loss import response_loss  # noqa: E402
from oloraplus.models.loading import load_model  # noqa: E402
from oloraplus.training.config import TrainConfig  # noqa: E402
from oloraplus.training.runtime import autocast  # noqa: E402

cfg = BenchConfig(model="smollm2-135m", n_train=256, n_eval=8)
tc = TrainConfig(output="unused", model=cfg.model, data=cfg.data, method="olora-plus", ratio=0.25)
model, tok = load_model(cfg.model)
_, train, _ = split_examples(cfg, tok)
model = apply_olora(model, tc.adapter_config())
fp32 = apply_olora(load_model(cfg.model)[0], tc.adapter_config()).train()
prepare_for_compute(model, "bf16", "cpu")  # installs AddmmLoRA
model.train()
layers = [m for m in model.modules() if isinstance(m, LoraLinear)]
ex = sorted(train, key=lambda e: len(e.input_ids))
batches = [collate(ex[i : i + 8], tok.pad_token_id) for i in range(0, 256, 32)]
print("lengths", [b["input_ids"].shape[1] for b in batches], flush=True)


def step(m, b, addmm: bool | None = None):
    if addmm is not None:
        for layer in layers:
            if addmm:
                layer.lora_variant["default"] = AddmmLoRA()
            else:
                layer.lora_variant.pop("default", None)
    use_attention(m, attention_kernel("auto", "cpu", b["input_ids"].shape[1]))
    t = time.thread_time()
    with autocast("bf16" if addmm is not None else "fp32", "cpu"):
        loss = response_loss(m, **b)
    loss.backward()
    seconds = time.thread_time() - t
    grads = {n: p.grad.float().clone() for n, p in m.named_parameters() if p.grad is not None}
    m.zero_grad(set_to_none=True)
    return seconds, loss.item(), grads


for i in (1, 4):
    _, ref_loss, ref = step(fp32, batches[i])
    for addmm in (False, True):
        _, loss, grads = step(model, batches[i], addmm)
        rel = sorted(((grads[n] - ref[n]).norm() / ref[n].norm()).item() for n in ref)
        print(f"batch {i} {'addmm  ' if addmm else 'vanilla'}: loss {loss:.5f} (fp32 {ref_loss:.5f}), "
              f"gradient error vs fp32: median {rel[len(rel) // 2]:.4f}, max {rel[-1]:.3f}", flush=True)
times = {False: [], True: []}
for _ in range(2):
    for b in batches:
        for addmm in times:
            times[addmm].append(step(model, b, addmm)[0])
print(f"vanilla {sum(times[False]):.1f} s, addmm {sum(times[True]):.1f} s, "
      f"speed-up {sum(times[False]) / sum(times[True]):.3f}")
