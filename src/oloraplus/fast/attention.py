"""The training attention kernel, chosen per batch, and our grouped eager kernel.

Three kernels can run a training batch: PyTorch's SDPA, transformers' own eager attention
(two matmuls and a softmax), and :func:`grouped_eager_attention`, the same eager arithmetic
arranged per key/value head. On CPU the grouped kernel trains faster than SDPA's flash kernel at
every batch length up to 512 tokens that we measured (SmolLM2 and Gemma 3 270M; the ratios are
in bench/NOTES.md), so ``"auto"`` takes it up to :data:`CPU_EAGER_MAX_LENGTH` padded tokens on CPU
and SDPA elsewhere. Evaluation always runs the model's own kernel.
"""

from __future__ import annotations

import functools

import torch

from oloraplus.errors import UserError
from oloraplus.models.loading import base_model

ATTENTIONS = ("auto", "grouped", "eager", "sdpa")

# Above this padded length "auto" takes SDPA on CPU too: the eager forms keep one [batch, heads,
# length, length] tensor per layer for the backward (quadratic in the length, over every layer),
# SDPA's flash kernel none. Up to it the grouped kernel was faster (bench/NOTES.md).
CPU_EAGER_MAX_LENGTH = 512

GROUPED = "oloraplus_grouped"  # our kernel's name in transformers' attention registry


def attention_kernel(choice: str, device: str, seq_len: int) -> str:
    """The transformers attention implementation for a training batch of padded length ``seq_len``."""
    if choice not in ATTENTIONS:
        raise UserError(f"attention must be one of {', '.join(ATTENTIONS)}, got '{choice}'")
    if choice == "auto":
        choice = "grouped" if device.startswith("cpu") and seq_len <= CPU_EAGER_MAX_LENGTH else "sdpa"
    return GROUPED if choice == "grouped" else choice


def current_attention(model: torch.nn.Module) -> str | None:
    """The attention implementation a (PEFT-wrapped) transformers model runs now."""
    return getattr(base_model(model).config, "_attn_implementation", None)


def use_attention(model: torch.nn.Module, kernel: str) -> None:
    """Switch a (PEFT-wrapped) transformers model to another attention implementation."""
    if kernel == GROUPED:
        _register_grouped()
    if current_attention(model) not in (None, kernel):
        base_model(model).set_attn_implementation(kernel)


def grouped_eager_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, softcap=None,
                            **kwargs):
    """Eager attention computed per key/value head: transformers' eager function, fewer passes.

    With grouped-query attention, transformers' eager kernel copies each key/value head once per
    query head that reads it (``repeat_kv``), and the backward sums those copies again. Here the
    G query heads of one key/value head are stacked along the sequence axis instead, so each
    key/value head is multiplied once, as it is. The scale and the mask are added in one pass
    (``add(mask, scores, alpha=scale)``), and the softmax runs in the scores' own dtype: PyTorch's
    CPU softmax accumulates bf16 in fp32 and rounds once, as transformers' fp32 softmax followed
    by a cast to bf16 does, without the two copies. In fp32 it computes the eager function to
    within float rounding (``tests/test_attention.py``), with fewer copies and passes, so it trains
    faster than the eager kernel (measured: bench/NOTES.md). Soft-capping and dropout are
    supported; the weights are returned as ``[batch, heads, query, key]`` like the eager kernel's.
    """
    b, h, t, d = query.shape
    hkv, s = key.shape[1], key.shape[2]
    g = h // hkv
    if scaling is None:
        scaling = module.head_dim**-0.5
    # query heads j*G .. j*G+G-1 read key/value head j (the order of transformers' repeat_kv)
    scores = torch.matmul(query.reshape(b, hkv, g * t, d), key.transpose(2, 3)).view(b, hkv, g, t, s)
    if softcap is not None:
        scores = torch.tanh(scores * (scaling / softcap)) * softcap
        scaling = 1.0
    if attention_mask is not None:
        mask = attention_mask[..., :s]
        mask = mask[:, :, None] if mask.shape[1] == 1 else mask.view(mask.shape[0], hkv, g, t, s)
        scores = torch.add(mask, scores, alpha=scaling)
    elif scaling != 1.0:
        scores = scores * scaling
    weights = torch.softmax(scores, dim=-1)
    weights = torch.nn.functional.dropout(weights, p=dropout, training=module.training)
    out = torch.matmul(weights.view(b, hkv, g * t, s), value)
    return out.view(b, h, t, d).transpose(1, 2).contiguous(), weights.view(b, h, t, s)


@functools.cache  # once per process: use_attention runs on every training step
def _register_grouped() -> None:
    """Make :func:`grouped_eager_attention` selectable by name, with the eager kernel's mask."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(GROUPED, grouped_eager_attention)
    AttentionMaskInterface.register(GROUPED, eager_mask)
