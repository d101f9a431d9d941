"""Opt-in regional compilation: ``torch.compile`` each decoder layer, and undo it for evaluation."""

from __future__ import annotations

import os
import shutil

import torch

from oloraplus.errors import UserError
from oloraplus.models.loading import base_model


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's repeated blocks: the classes transformers lists in ``_no_split_modules``."""
    names = set(getattr(base_model(model), "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names]


def compile_layers(model: torch.nn.Module, device: str) -> int:
    """``torch.compile`` each decoder layer in place (regional compilation); returns how many.

    The layers share one code object, so inductor compiles one layer (forward and backward, with
    dynamic sequence lengths) and reuses it for all; whole-model compilation compiled every layer
    separately. The first step pays the compile (less with a warm inductor cache: the compiled
    kernels are cached on disk, ``TORCHINDUCTOR_CACHE_DIR``), then steps run faster (the measured
    start-up and per-step gain: bench/NOTES.md). So it pays for runs with several minutes of
    training, or many runs of one model (a grid), not for short ones: off by default (``--compile``). Undone by :func:`uncompile_layers`.
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
        # getattr: on the plain path (nothing compiled) this must not depend on the internal at all
        if getattr(module, "_compiled_call_impl", None) is not None:
            module._compiled_call_impl = None
            compiled = True
    if compiled:
        torch.compiler.reset()
