"""Speed patch: bf16 storage of the frozen base weights, without PEFT's fp32 cast of adapter inputs."""

from __future__ import annotations

import torch


def prepare_for_compute(model: torch.nn.Module, precision: str, device: str) -> torch.nn.Module:
    """Make a (PEFT-wrapped) model fast for the resolved precision, without changing its function.

    Each LoRA update is added inside its up-projection's matmul (:class:`oloraplus.fast.addmm.AddmmLoRA`).
    Under bf16 the frozen base weights are stored in bf16 (autocast would otherwise cast every
    fp32 weight to bf16 again on every forward pass: frozen weights are not in its cache), and
    PEFT's cast of each adapter's input to fp32 is switched off (autocast runs the adapter
    matmuls in bf16 anyway; the adapter weights and their optimiser state stay fp32). This is
    done after the OLoRA init, so W - s*B*A is computed in fp32 and rounded once.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    from oloraplus.fast.addmm import use_addmm_lora

    use_addmm_lora(model)
    if precision == "bf16":
        for name, param in model.named_parameters():
            if "lora_" not in name and not param.requires_grad and param.dtype == torch.float32:
                param.data = param.data.to(torch.bfloat16)
        for module in model.modules():
            if isinstance(module, BaseTunerLayer):
                module.cast_input_dtype_enabled = False
    return model
