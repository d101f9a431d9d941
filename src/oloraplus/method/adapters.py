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

PiSSA (Meng et al. 2024) starts from W's top-r singular triplets instead: for W = U S V^T,
B = U_r sqrt(S_r / s) and A = sqrt(S_r / s) V_r^T, so s*B*A = U_r S_r V_r^T is W's best rank-r
approximation and the base becomes the residual W - U_r S_r V_r^T. This is PEFT's
``init_lora_weights="pissa"`` (exact SVD, in float32), and the saved config says "pissa", so PEFT
re-runs the same SVD when it loads the adapter (s*B*A is sign-free, so the base it builds is ours).

Every init is one :data:`INITS` entry: the value PEFT records in ``adapter_config.json`` and the
function giving the start factors (B_0, A_0) from a weight, a rank and the scale s (none for
PEFT's default init, which leaves the base alone). ``apply_adapters`` and ``oloraplus export``
read the table, so a new init method is an entry here, one factor function and its
``method.registry`` entries.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer

from oloraplus.errors import UserError, check_positive
from oloraplus.method.identity import check_untied_targets
from oloraplus.models.families import default_target_modules

Factors = Callable[[torch.Tensor, int, float], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Init:
    """One adapter initialisation.

    ``peft_value`` is PEFT's ``init_lora_weights`` for it, the value written to
    ``adapter_config.json`` so that plain PEFT rebuilds the same start on load. ``factors`` maps
    (W, r, s) to the float32 start (B_0, A_0); the base weight becomes W - s*B_0*A_0. ``None``
    means PEFT's own random init with B_0 = 0 and the base left as it is.
    """

    peft_value: bool | str
    factors: Factors | None = None


@dataclass
class OLoRAPlusConfig:
    """Adapter settings for OLoRA+, plus optional optimiser settings the Trainer must honour.

    ``lr``, ``ratio`` and ``weight_decay`` default to ``None``, "not given". :func:`apply_adapters`
    records the config on the model it returns, and :class:`~oloraplus.method.trainer.OLoRAPlusTrainer`
    reads it: a ratio given here is used (and must agree with one given to the Trainer or its
    arguments); an ``lr`` or ``weight_decay`` given here must equal the ``TrainingArguments``'
    ``learning_rate`` / ``weight_decay``, which the optimiser uses. Either way a value set here
    reaches the optimiser's groups or stops the run with a :class:`UserError` naming both
    places; it is never silently dropped.
    """

    rank: int = 32
    alpha: float = 16
    dropout: float = 0.0
    target_modules: list[str] | str | None = None  # None: every attention/MLP Linear of the family
    init: str = "olora"  # a key of INITS: "olora", "pissa", or "lora" (PEFT's default, B = 0)
    lr: float | None = None  # lr_A; None: the Trainer's learning_rate
    ratio: float | None = None  # lambda = lr_B / lr_A; None: the Trainer's ratio (1 if none is given)
    weight_decay: float | None = None  # None: the Trainer's weight_decay
    modules_to_save: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        check_positive("rank", self.rank, integer=True)
        check_positive("alpha", self.alpha)
        if self.lr is not None:
            check_positive("lr", self.lr)
        if self.ratio is not None:
            check_positive("ratio", self.ratio)
        if not (0.0 <= self.dropout < 1.0):
            raise UserError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.weight_decay is not None and not (0.0 <= self.weight_decay < float("inf")):
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
def pissa_factors(weight: torch.Tensor, rank: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PiSSA's starting factors in float32: ``B = U_r sqrt(S_r / s)``, ``A = sqrt(S_r / s) V_r^T``.

    The exact SVD PEFT's ``init_lora_weights="pissa"`` runs, so ``s * B @ A`` is W's best rank-r
    approximation and matches what PEFT rebuilds on load.
    """
    u, s_values, vh = torch.linalg.svd(weight.detach().to(torch.float32), full_matrices=False)
    root = torch.sqrt(s_values[:rank] / scale)
    return (u[:, :rank] * root).contiguous(), (root[:, None] * vh[:rank]).contiguous()


INITS: dict[str, Init] = {
    "olora": Init("olora", lambda weight, rank, scale: olora_factors(weight, rank)),
    "pissa": Init("pissa", pissa_factors),
    "lora": Init(True),
}


@torch.no_grad()
def _init_layer(layer: LoraLayer, adapter: str, factors: Factors) -> None:
    base = layer.get_base_layer()
    rank, scale = layer.r[adapter], layer.scaling[adapter]
    b, a = factors(base.weight, rank, scale)
    layer.lora_A[adapter].weight.data = a.to(layer.lora_A[adapter].weight.dtype)
    layer.lora_B[adapter].weight.data = b.to(layer.lora_B[adapter].weight.dtype)
    residual = base.weight.to(torch.float32) - scale * (b @ a)
    base.weight.data = residual.to(base.weight.dtype)


def init_for_peft_value(value) -> str | None:
    """The :data:`INITS` name whose start PEFT builds for ``init_lora_weights=value``.

    PEFT's standard inits (``True``, ``False``, ``"gaussian"``) all leave the base alone and read
    as ``"lora"``; an init this package does not implement gives ``None``.
    """
    if value in (True, False, "gaussian"):
        return "lora"
    return next((name for name, init in INITS.items() if init.peft_value == value), None)


# The attribute apply_adapters records its config under, read back by adapter_settings.
_SETTINGS_ATTR = "oloraplus_config"


def adapter_settings(model: torch.nn.Module) -> OLoRAPlusConfig | None:
    """The :class:`OLoRAPlusConfig` that :func:`apply_adapters` built ``model`` with, else ``None``.

    Looks through wrappers that keep the model as ``.module`` (DDP, DeepSpeed).
    """
    while model is not None:
        found = model.__dict__.get(_SETTINGS_ATTR)
        if found is not None:
            return found
        model = model.__dict__.get("_modules", {}).get("module")
    return None


def apply_adapters(model: torch.nn.Module, config: OLoRAPlusConfig | None = None) -> PeftModel:
    """Wrap ``model`` with PEFT LoRA adapters started by ``config.init`` (see :data:`INITS`).

    The factorisation (QR for OLoRA, SVD for PiSSA) runs in float32 whatever the model dtype;
    adapter weights are kept in float32. The returned model's output at step 0 equals the input
    model's (up to the dtype's rounding of W - s*B*A). ``config`` is recorded on the returned
    model (:func:`adapter_settings`), so the optimiser settings it gives reach
    :class:`~oloraplus.method.trainer.OLoRAPlusTrainer`. Raises :class:`UserError` when a target
    is missing, not a Linear, or smaller than the rank.
    """
    config = config or OLoRAPlusConfig()
    init = INITS[config.init]
    targets = config.target_modules or default_target_modules(model)
    if isinstance(targets, str) and targets != "all-linear":
        targets = [targets]  # PEFT reads a plain string as a full-name regex
    _check_targets(model, targets, config.rank)
    check_untied_targets(model, targets)  # e.g. lm_head tied to the embeddings
    lora_config = LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=targets,
        modules_to_save=config.modules_to_save or None,
        # For a factor init, skip PEFT's random init: we overwrite A and B right after.
        init_lora_weights=False if init.factors else init.peft_value,
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
            if init.factors:
                _init_layer(layer, adapter, init.factors)
    for peft_config in peft_model.peft_config.values():
        peft_config.init_lora_weights = init.peft_value  # what a loader must re-run on the original base
    setattr(peft_model, _SETTINGS_ATTR, config)
    return peft_model


# The name the package started with; it applies every init in INITS, not only OLoRA.
apply_olora = apply_adapters


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
