"""LoRA+ optimiser groups: lr_B = ratio * lr_A.

LoRA+ (Hayou et al. 2024) trains the up-projection B with a larger learning rate than the
down-projection A. OLoRA+ keeps the two-group idea but uses any ratio: below 1 ("Refinement")
A moves faster and B stays near its orthonormal OLoRA start; above 1 ("Exploration") B moves
away from it.
"""

from __future__ import annotations

import torch

from oloraplus.errors import UserError, check_positive


def create_optimizer(
    model: torch.nn.Module,
    lr: float,
    ratio: float,
    weight_decay: float = 0.0,
    optimizer_cls: type[torch.optim.Optimizer] = torch.optim.AdamW,
    **optimizer_kwargs,
) -> torch.optim.Optimizer:
    """Build an optimiser whose ``lora_B`` parameters learn at ``ratio * lr``, all others at ``lr``.

    Every trainable parameter lands in exactly one group. Groups (empty ones are left out):
    ``lora_A`` (the A matrices and any other trainable matrix: modules_to_save, ...) with
    ``weight_decay``; ``lora_B`` with ``weight_decay``; ``no_decay`` (1-D parameters: biases and
    norms) at ``lr`` without weight decay.

    This differs from PEFT's ``create_loraplus_optimizer`` on purpose: PEFT puts every 1-D
    parameter (biases, norms) in B's group at ``ratio * lr`` and defaults the weight decay to 0
    regardless of what is passed as ``weight_decay``. Here only B gets the ratio, and the weight
    decay given is applied (except to biases and norms). Any ``ratio > 0`` is accepted, below 1
    as well as above.
    """
    check_positive("lr", lr)
    check_positive("ratio", ratio)
    if not (0.0 <= weight_decay < float("inf")):
        raise UserError(f"weight_decay must be >= 0 and finite, got {weight_decay}")
    groups = {"lora_A": [], "lora_B": [], "no_decay": []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if "lora_B" in name:
            groups["lora_B"].append(param)
        elif param.ndim < 2:
            groups["no_decay"].append(param)
        else:
            groups["lora_A"].append(param)
    settings = {
        "lora_A": (lr, weight_decay),
        "lora_B": (lr * ratio, weight_decay),
        "no_decay": (lr, 0.0),
    }
    param_groups = [
        {"params": params, "lr": settings[key][0], "weight_decay": settings[key][1], "name": key}
        for key, params in groups.items()
        if params
    ]
    if not param_groups:
        raise UserError("the model has no trainable parameters")
    return optimizer_cls(param_groups, lr=lr, **optimizer_kwargs)


def optimizer_groups(optimizer: torch.optim.Optimizer) -> dict[str, dict]:
    """Each named parameter group's starting learning rate and size (for results.json).

    ``initial_lr`` is the rate before the scheduler's decay, so lr_B / lr_A reads the ratio
    at any step, also after a resume.
    """
    return {
        group.get("name", str(i)): {
            "lr": group.get("initial_lr", group["lr"]),
            "parameters": sum(p.numel() for p in group["params"]),
        }
        for i, group in enumerate(optimizer.param_groups)
    }
