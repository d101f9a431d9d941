"""Device and precision: where the model runs and whether matmuls run in bf16.

bf16 autocast is the default where the hardware has native bf16 matrix instructions (CUDA
with bf16 support, or a CPU with AVX512-BF16 / AMX): on such CPUs bf16 matmuls run several
times faster than fp32 (measured peaks: bench/NOTES.md). Elsewhere it falls back to fp32.
``--precision`` forces either.
"""

from __future__ import annotations

import contextlib

import torch

from oloraplus.errors import UserError
from oloraplus.fast.compile import uncompile_layers
from oloraplus.training.provenance import host

PRECISIONS = ("auto", "bf16", "fp32")




def cpu_has_fast_bf16() -> bool:
    found = host()
    return found["avx512_bf16"] or found["amx_bf16"]


def resolve_precision(precision: str, device: str) -> str:
    """Turn "auto" into "bf16" or "fp32" for this device."""
    if precision not in PRECISIONS:
        raise UserError(f"precision must be one of {', '.join(PRECISIONS)}, got '{precision}'")
    if precision != "auto":
        return precision
    if device.startswith("cuda"):
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_fast_bf16() else "fp32"


def autocast(precision: str, device: str):
    """Autocast context for the resolved precision (a no-op for fp32)."""
    if precision == "bf16":
        return torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16)
    return contextlib.nullcontext()


def merged_for_eval(model: torch.nn.Module) -> torch.nn.Module:
    """The trained function as one plain fp32 model, for evaluation.

    Merging the adapters removes their per-layer overhead from every generation step, and
    fp32 makes greedy decoding independent of how prompts are batched (in bf16, batched and
    one-at-a-time greedy outputs differ for many Alpaca prompts, in fp32 for none; bench/NOTES.md). The
    weights are the trained ones: a bf16-stored residual W - s*B*A is upcast exactly.
    Consumes ``model`` (the merge is in place): save the adapter first. Compiled layers run
    eagerly again (evaluation's shapes, dtype and KV cache would only make them recompile).
    """
    uncompile_layers(model)
    model.float()
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    return model.eval()
