"""OLoRA adapters: the configuration and ``apply_olora``.

OLoRA (Büyükakyüz 2024) starts each LoRA adapter from the QR decomposition of the weight it
adapts: for W (out x in) = QR, B = Q[:, :r] (orthonormal columns) and A = R[:r, :]. The base
weight becomes W - s*B*A (s = alpha / r), so the model computes the same function at step 0.

PEFT implements this as ``init_lora_weights="olora"`` with a full QR of W. We compute the same
B and A from a QR of W's first r columns only: Householder QR builds column k of Q from columns
0..k of W, so Q[:, :r] of W equals Q of W[:, :r], and R[:r, :] = Q_r^T W. That costs
O(out*in*r) instead of O(out*in*min(out, in)). The saved adapter config still says "olora",
so plain PEFT re-creates the same starting point when it loads the adapter on the original
base model (B*A is the projection of W onto its first r columns, whatever the QR's signs).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer

from oloraplus.errors import UserError, check_positive
from oloraplus.models.families import default_target_modules

INITS = ("olora", "lora")


@dataclass
class OLoRAPlusConfig:
    """Adapter and optimiser settings for OLoRA+ (defaults are the paper's)."""

    rank: int = 32
    alpha: float = 16
    dropout: float = 0.0
    target_modules: list[str] | str | None = None  # None: every attention/MLP Linear of the family
    init: str = "olora"  # "olora", or "lora" for PEFT's default init (B = 0), for comparisons
    lr: float = 3e-4
    ratio: float = 1.0  # lambda = lr_B / lr_A
    weight_decay: float = 0.0
    modules_to_save: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        check_positive("rank", self.rank, integer=True)
        check_positive("alpha", self.alpha)
        check_positive("lr", self.lr)
        check_positive("ratio", self.ratio)
        if not (0.0 <= self.dropout < 1.0):
            raise UserError(f"dropout must be in [0, 1), got {self.dropout}")
        if not (self.weight_decay >= 0.0 and self.weight_decay < float("inf")):
            raise UserError(f"weight_decay must be >= 0 and finite, got {self.weight_decay}")
        if self.init not in INITS:
            raise UserError(f"init must be one of {', '.join(INITS)}, got '{self.init}'")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


def _check_targets(model: torch.nn.Module, targets: list[str] | str, rank: int) -> None:
    """Fail early, with names, on targets that match nothing, are not Linear, or are too small."""
    if targets == "all-linear":
        return
    names = [targets] if isinstance(targets, str) else list(targets)
    matched = {t: [] for t in names}
    for module_name, module in model.named_modules():
        for t in names:
            if module_name == t or module_name.endswith("." + t):
                matched[t].append((module_name, module))
    missing = [t for t, found in matched.items() if not found]
    if missing:
        raise UserError(f"target modules not found in the model: {', '.join(missing)}")
    for found in matched.values():
        for module_name, module in found:
            if not isinstance(module, torch.nn.Linear):
                raise UserError(
                    f"target module '{module_name}' is a {type(module).__name__}, not a Linear layer"
                )
            limit = min(module.out_features, module.in_features)
            if rank > limit:
                raise UserError(
                    f"rank {rank} is larger than target layer '{module_name}' allows "
                    f"(min(out, in) = {limit}); use --rank {limit} or less"
                )


@torch.no_grad()
def olora_factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """OLoRA's starting factors for one weight, in float32: ``B = Q[:, :r]``, ``A = R[:r, :]``."""
    w = weight.detach().to(torch.float32)
    q, r_small = torch.linalg.qr(w[:, :rank])  # Q_r and the leading r x r block of R
    a = q.T @ w  # R[:r, :] = Q_r^T W
    a[:, :rank] = r_small  # exact upper triangle where R is known exactly
    return q.contiguous(), a.contiguous()


@torch.no_grad()
def _olora_init_layer(layer: LoraLayer, adapter: str) -> None:
    base = layer.get_base_layer()
    rank, scale = layer.r[adapter], layer.scaling[adapter]
    b, a = olora_factors(base.weight, rank)
    layer.lora_A[adapter].weight.data = a.to(layer.lora_A[adapter].weight.dtype)
    layer.lora_B[adapter].weight.data = b.to(layer.lora_B[adapter].weight.dtype)
    residual = base.weight.to(torch.float32) - scale * (b @ a)
    base.weight.data = residual.to(base.weight.dtype)


def apply_olora(model: torch.nn.Module, config: OLoRAPlusConfig | None = None) -> PeftModel:
    """Wrap ``model`` with PEFT LoRA adapters initialised by OLoRA (or PEFT's default init).

    The QR runs in float32 whatever the model dtype; adapter weights are kept in float32.
    The returned model's output at step 0 equals the input model's (up to the dtype's rounding
    of W - s*B*A). Raises :class:`UserError` when a target is missing, not a Linear, or smaller
    than the rank.
    """
    config = config or OLoRAPlusConfig()
    targets = config.target_modules or default_target_modules(model)
    if isinstance(targets, str) and targets != "all-linear":
        targets = [targets]  # PEFT reads a plain string as a full-name regex
    _check_targets(model, targets, config.rank)
    lora_config = LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=targets,
        modules_to_save=config.modules_to_save or None,
        # For OLoRA, skip PEFT's random init: we overwrite A and B right after.
        init_lora_weights=False if config.init == "olora" else True,
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        peft_model = get_peft_model(model, lora_config, autocast_adapter_dtype=True)
    except ValueError as exc:
        raise UserError(f"cannot add LoRA adapters: {exc}") from exc
    layers = [m for m in peft_model.modules() if isinstance(m, LoraLayer)]
    for layer in layers:
        for adapter in layer.lora_A:
            base = layer.get_base_layer()
            if not isinstance(base, torch.nn.Linear):
                raise UserError(f"target {type(base).__name__} is not a Linear layer")
            if config.rank > min(base.in_features, base.out_features):
                raise UserError(
                    f"rank {config.rank} is larger than a target layer allows "
                    f"(min(out, in) = {min(base.in_features, base.out_features)})"
                )
            layer.lora_A[adapter].float()
            layer.lora_B[adapter].float()
            if config.init == "olora":
                _olora_init_layer(layer, adapter)
    if config.init == "olora":
        for peft_config in peft_model.peft_config.values():
            peft_config.init_lora_weights = "olora"  # what a loader must re-run on the original base
    return peft_model


def lora_layers(model: torch.nn.Module) -> dict[str, LoraLayer]:
    """Every LoRA layer of a PEFT model by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def load_adapter_weights(adapter_dir: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a saved PEFT adapter folder (safetensors or .bin), on the CPU."""
    from peft.utils import load_peft_weights

    try:
        return load_peft_weights(str(adapter_dir), device="cpu")
    except Exception as exc:
        raise UserError(f"cannot read the adapter weights in {adapter_dir}: {exc}") from exc
