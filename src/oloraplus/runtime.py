"""Device and precision: where the model runs and whether matmuls run in bf16.

bf16 autocast is the default where the hardware has native bf16 matrix instructions (CUDA
with bf16 support, or a CPU with AVX512-BF16 / AMX): on such CPUs bf16 matmuls run about 4x
faster than fp32. Elsewhere it falls back to fp32. ``--precision`` forces either.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import shutil
from pathlib import Path

import torch

from .errors import UserError

PRECISIONS = ("auto", "bf16", "fp32")


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def cpu_has_fast_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: str) -> str:
    """Turn "auto" into "bf16" or "fp32" for this device."""
    if precision not in PRECISIONS:
        raise UserError(f"precision must be one of {', '.join(PRECISIONS)}, got '{precision}'")
    if precision != "auto":
        return precision
    if device.startswith("cuda"):
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_fast_bf16() else "fp32"


def base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def keep_freed_memory(device: str) -> bool:
    """On CPU under glibc, let freed memory be reused instead of handed back to the kernel.

    By default glibc's malloc serves every block of 32 MiB or more with its own ``mmap`` and
    unmaps it on ``free``, and it trims the heap's free top; the next block of that size is then
    faulted in again, one zero-filled 4 KiB page at a time. A training step allocates and frees
    such blocks all the time (the LM head's logits: 256 rows x 262k vocabulary x 4 bytes is 268 MB
    per chunk on Gemma), and the page faults cost about as much as the arithmetic around them:
    one chunk of Gemma's fused head took 686 ms with glibc's defaults and 510 ms with freed
    memory kept (``bench/head_passes_probe.py``). With mmap off and the trim threshold at 2 GiB,
    freed blocks stay in the heap for the next allocation. Whole training runs: Gemma 3 270M
    255 -> 289 tokens/s, SmolLM2 unchanged within noise, peak RSS 0.1-0.8 GB higher (1.0 GB on
    Gemma in the full bench, together with the fused head's new passes; bench/NOTES.md). The
    setting is process-wide and cannot be undone, so only ``oloraplus train``/``evaluate``/
    ``bench`` call it; in your own script call it once at the start. Returns whether it was
    applied (CPU, Linux, glibc).
    """
    if not device.startswith("cpu") or platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    mallopt = ctypes.CDLL(None).mallopt  # glibc's, from the process's own symbol table
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


def autocast(precision: str, device: str):
    """Autocast context for the resolved precision (a no-op for fp32)."""
    if precision == "bf16":
        return torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16)
    return contextlib.nullcontext()


def prepare_for_compute(model: torch.nn.Module, precision: str, device: str) -> torch.nn.Module:
    """Make a (PEFT-wrapped) model fast for the resolved precision, without changing its function.

    Each LoRA update is added inside its up-projection's matmul (:class:`adapters.AddmmLoRA`).
    Under bf16 the frozen base weights are stored in bf16 (autocast would otherwise cast every
    fp32 weight to bf16 again on every forward pass: frozen weights are not in its cache), and
    PEFT's cast of each adapter's input to fp32 is switched off (autocast runs the adapter
    matmuls in bf16 anyway; the adapter weights and their optimiser state stay fp32). This is
    done after the OLoRA init, so W - s*B*A is computed in fp32 and rounded once.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    from .adapters import use_addmm_lora

    use_addmm_lora(model)
    if precision == "bf16":
        for name, param in model.named_parameters():
            if "lora_" not in name and not param.requires_grad and param.dtype == torch.float32:
                param.data = param.data.to(torch.bfloat16)
        for module in model.modules():
            if isinstance(module, BaseTunerLayer):
                module.cast_input_dtype_enabled = False
    return model


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's repeated blocks: the classes transformers lists in ``_no_split_modules``."""
    names = set(getattr(base_model(model), "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names]


def compile_layers(model: torch.nn.Module, device: str) -> int:
    """``torch.compile`` each decoder layer in place (regional compilation); returns how many.

    The layers share one code object, so inductor compiles one layer (forward and backward, with
    dynamic sequence lengths) and reuses it for all; whole-model compilation compiled every layer
    separately and took minutes. Measured on SmolLM2 training (2 CPU cores, bench/NOTES.md): the
    first step takes about 50 s longer with an empty inductor cache and 8 s with a warm one (the
    compiled kernels are cached on disk, ``TORCHINDUCTOR_CACHE_DIR``), then steps run 1.10-1.13x faster.
    So it pays for runs with several minutes of training, or many runs of one model (a grid), not
    for short ones: off by default (``--compile``). Undone by :func:`uncompile_layers`.
    """
    layers = decoder_layers(model)
    if not layers:
        raise UserError("--compile: no decoder layers found in this model (its _no_split_modules is empty)")
    if device.startswith("cpu") and not any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "c++", "clang++")):
        raise UserError("--compile on CPU needs a C++ compiler (g++ or clang++) on PATH, or set CXX")
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)


def uncompile_layers(model: torch.nn.Module) -> None:
    """Run every module eagerly again (undoes :func:`compile_layers`).

    Also drops the process's compiled code, so that the next run in the same process (a grid)
    compiles afresh (from inductor's disk cache) instead of piling up recompilations until dynamo
    gives up on them, and does not keep this model's graphs alive.
    """
    compiled = False
    for module in model.modules():
        compiled |= module._compiled_call_impl is not None
        module._compiled_call_impl = None
    if compiled:
        torch.compiler.reset()


def merged_for_eval(model: torch.nn.Module) -> torch.nn.Module:
    """The trained function as one plain fp32 model, for evaluation.

    Merging the adapters removes their per-layer overhead from every generation step, and
    fp32 makes greedy decoding independent of how prompts are batched (in bf16, batched and
    one-at-a-time greedy outputs differed for 44% of Alpaca prompts; in fp32 for none). The
    weights are the trained ones: a bf16-stored residual W - s*B*A is upcast exactly.
    Consumes ``model`` (the merge is in place): save the adapter first. Compiled layers run
    eagerly again (evaluation's shapes, dtype and KV cache would only make them recompile).
    """
    uncompile_layers(model)
    model.float()
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    return model.eval()
