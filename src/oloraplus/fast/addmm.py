"""Speed patch: each LoRA update added inside its up-projection's matmul (PEFT's ``lora_variant`` hook)."""

from __future__ import annotations

import torch
from peft.tuners.lora import LoraLayer
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.lora.layer import LoraVariant

from oloraplus.fast.dropout import dropout_lora_a


class AddmmLoRA(LoraVariant):
    """Vanilla LoRA whose update is added inside the up-projection's matmul.

    PEFT computes ``result + lora_B(lora_A(x)) * s``: two element-wise passes over the layer's
    whole output (the scaling and the sum) forward and one backward, on top of three matmuls.
    Here ``torch.addmm(result, lora_A(x), B^T, alpha=s)`` lets the matmul scale and accumulate
    into the base output, and autograd scales the r-wide intermediate instead of the output:
    the same function (summed in the matmul's accumulator, so rounded once instead of three
    times) for less training time (measured: bench/NOTES.md). Merging is vanilla.
    Installed by :func:`use_addmm_lora` on layers with no other variant and no LoRA bias,
    through PEFT's variant hook (the one DoRA uses; PEFT calls it private, so the tests compare
    the result with PEFT's own forward, gradients and merge). A training ``nn.Dropout`` with
    p > 0 in front of ``lora_A`` is computed by :func:`oloraplus.fast.dropout.dropout_lora_a`
    (the same function, a cheaper mask), reading p from PEFT's module.
    """

    @staticmethod
    def forward(module: LoraLayer, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs) -> torch.Tensor:
        lora_a, lora_b = module.lora_A[active_adapter], module.lora_B[active_adapter]
        h = _dropped_lora_a(module.lora_dropout[active_adapter], lora_a, x)
        if h is None:
            h = lora_a(module.lora_dropout[active_adapter](x))
        if h.dtype != result.dtype and not torch.is_autocast_enabled(result.device.type):
            return result + lora_b(h) * module.scaling[active_adapter]  # mixed dtypes: PEFT's own sum
        out = torch.addmm(result.reshape(-1, result.shape[-1]), h.reshape(-1, h.shape[-1]), lora_b.weight.t(),
                          alpha=module.scaling[active_adapter])
        return out.view(result.shape)

    @staticmethod
    def merge_safe(module: LoraLayer, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        return orig_weight + module.get_delta_weight(active_adapter).to(orig_weight.dtype)

    @staticmethod
    def merge_unsafe(module: LoraLayer, active_adapter: str, orig_weight: torch.Tensor) -> None:
        orig_weight.data += module.get_delta_weight(active_adapter).to(orig_weight.dtype)

    @staticmethod
    def unmerge(module: LoraLayer, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        return orig_weight - module.get_delta_weight(active_adapter).to(orig_weight.dtype)


def _dropped_lora_a(dropout: torch.nn.Module, lora_a: torch.nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """``lora_a(dropout(x))`` through :func:`~oloraplus.fast.dropout.dropout_lora_a`, or None to use PEFT's path.

    Only a training, not in-place ``nn.Dropout`` (exactly that class) with p > 0 in front of a
    bias-free ``nn.Linear`` is taken over (eval mode, p == 0, ``nn.Identity`` and anything else stay
    PEFT's, which is then the identity or unknown to us). The operands are cast as autocast would cast ``lora_a``'s matmul; outside
    autocast, mixed dtypes stay PEFT's too (its path decides what they mean).
    """
    if not (type(dropout) is torch.nn.Dropout and dropout.training and dropout.p > 0 and not dropout.inplace):
        return None
    if type(lora_a) is not torch.nn.Linear or lora_a.bias is not None:
        return None
    weight, device = lora_a.weight, x.device.type
    if torch.is_autocast_enabled(device):
        if not (x.dtype in _AUTOCAST_INPUTS and weight.dtype in _AUTOCAST_INPUTS):
            return None
        dtype = torch.get_autocast_dtype(device)
        return dropout_lora_a(x.to(dtype), weight.to(dtype), dropout.p)
    if x.dtype != weight.dtype:
        return None
    return dropout_lora_a(x, weight, dropout.p)


_AUTOCAST_INPUTS = (torch.float32, torch.float16, torch.bfloat16)


def use_addmm_lora(model: torch.nn.Module) -> int:
    """Install :class:`AddmmLoRA` on every vanilla LoRA Linear of ``model``; returns how many."""
    count = 0
    for layer in model.modules():
        if not isinstance(layer, LoraLinear):
            continue
        for adapter, lora_b in layer.lora_B.items():
            if adapter not in layer.lora_variant and lora_b.bias is None:
                layer.lora_variant[adapter] = AddmmLoRA()
                count += 1
    return count
