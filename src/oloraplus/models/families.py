"""What oloraplus knows per model family: the Linear layers OLoRA adapts by default, and which
families' logits are exactly ``lm_head(h)`` (then the fused head-and-loss may replace them).

The one place to edit for a new model family.
"""

from __future__ import annotations

import torch

# Every Linear in the attention and MLP blocks, per model family.
DEFAULT_TARGETS: dict[str, list[str]] = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gemma": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
}

FAMILY_OF = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "gemma": "gemma",
    "gemma2": "gemma",
    "gemma3": "gemma",
    "gemma3_text": "gemma",
    "opt": "opt",
}


def default_target_modules(model: torch.nn.Module) -> list[str] | str:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    family = FAMILY_OF.get(model_type)
    return DEFAULT_TARGETS[family] if family else "all-linear"


# Causal LMs whose logits are exactly lm_head(h), then the optional final_logit_softcapping.
FUSABLE_MODEL_TYPES = frozenset({"llama", "gemma3_text", "opt"})
