"""Speed patch: LoRA's input dropout drawn as a short list of dropped positions instead of a full mask.

PEFT's ``lora_dropout`` is an ``nn.Dropout`` in front of ``lora_A``: on CPU it draws one random
number per element of the adapter's input (a full-size ``bernoulli_``), multiplies by the scaled
mask, and autograd keeps both the mask and the dropped copy of the input for the backward pass.
At small p, drawing the mask costs more than the rest of the adapter (measured: bench/NOTES.md).

Here the same mask is drawn as the positions of its dropped elements: the gaps between successive
dropped elements of an i.i.d. Bernoulli(p) sequence are i.i.d. geometric, so about ``p * numel``
random numbers describe the whole mask (:func:`draw_drops`). :func:`dropout_lora_a` then computes
``lora_A(dropout(x)) = ((x * keep) @ A^T) / (1 - p)`` in one autograd function that zeroes the
dropped positions of a copy of ``x`` in place, scales the r-wide product instead of the input, and
keeps the dropped copy and the index list for the backward pass (it zeroes the same positions of
the input gradient): no full-size mask is ever made or kept. Keeping ``x`` instead of the dropped
copy and rebuilding the copy in the backward pass would hold less memory when several adapters
share one input (q/k/v, gate/up), but rebuilding it cost more step time than the memory is worth
(measured: bench/NOTES.md).
"""

from __future__ import annotations

import math

import torch

_INV_2_63 = 2.0**-63


def draw_drops(numel: int, p: float, device: torch.device | str = "cpu", generator: torch.Generator | None = None,
               block: int | None = None) -> torch.Tensor:
    """The flat positions, sorted and distinct, that one dropout mask over ``numel`` elements drops.

    Contract: the same distribution as ``torch.bernoulli`` masks: each position is dropped
    independently with probability ``p`` (``0 < p < 1``), and every call is a fresh draw from
    ``generator`` (default: the device's default generator, so ``torch.manual_seed`` makes runs
    reproducible). Returns an int64 tensor on ``device``.

    How: the number of kept positions before each dropped one is geometric, ``floor(E / -log(1-p))``
    with ``E = -log(U)`` exponential, so the positions are a cumulative sum of such gaps plus one per
    drop. ``U`` is built from 63 random bits per gap (``(r + 1) * 2**-63``, in (0, 1], so never
    ``log(0)``) because integer bits are the cheapest thing the CPU generator makes. Gaps are drawn
    in blocks sized well above the expected count; in the rare case that they do not reach
    ``numel``, more are drawn, so the cut at ``numel`` never biases the mask (``block`` overrides the
    block size, so that tests can exercise that path).
    """
    if not 0.0 < p < 1.0:
        raise ValueError(f"draw_drops needs 0 < p < 1, got {p}")
    scale = -1.0 / math.log1p(-p)
    mean = numel * p
    block = block or int(mean + 6.0 * math.sqrt(mean) + 16)
    parts, start = [], 0  # start: the first position not yet covered by a drawn gap
    while start < numel:
        bits = torch.empty(block, dtype=torch.int64, device=device).random_(generator=generator)
        gaps = bits.to(torch.float64).add_(1.0).mul_(_INV_2_63).log_().mul_(-scale).floor_()
        pos = gaps.cumsum_(0).to(torch.int64).add_(torch.arange(start, start + block, device=device))
        last = int(pos[-1])
        parts.append(pos[: int(torch.searchsorted(pos, numel))] if last >= numel else pos)
        start = last + 1
    return parts[0] if len(parts) == 1 else torch.cat(parts)


class _DroppedLinear(torch.autograd.Function):
    """``((x with the positions ``drops`` zeroed) @ weight^T) * scale``; saves the dropped copy and ``drops``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, drops: torch.Tensor, scale: float) -> torch.Tensor:
        kept = torch.clone(x, memory_format=torch.contiguous_format)
        kept.view(-1).index_fill_(0, drops, 0)
        ctx.save_for_backward(kept, weight, drops)
        ctx.scale = scale
        return torch.matmul(kept, weight.t()).mul_(scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        kept, weight, drops = ctx.saved_tensors
        grad = grad * ctx.scale  # r wide: cheaper than scaling either full-width operand
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.matmul(grad, weight.to(grad.dtype))
            grad_x.view(-1).index_fill_(0, drops, 0)
        if ctx.needs_input_grad[1]:
            grad_w = grad.reshape(-1, grad.shape[-1]).t().mm(kept.reshape(-1, kept.shape[-1]).to(grad.dtype))
        return grad_x, grad_w, None, None


def dropout_lora_a(x: torch.Tensor, weight: torch.Tensor, p: float, drops: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(F.dropout(x, p, training=True), weight)``, the same function with a cheaper mask.

    Contract: inverted dropout (each element of ``x`` kept with probability ``1 - p``, kept values
    scaled by ``1 / (1 - p)``), a fresh mask per call from :func:`draw_drops` unless ``drops`` (flat
    positions into ``x`` in C order) is given; ``0 < p < 1``. ``x`` and ``weight`` must have the
    same dtype (the caller casts them as autocast would); no bias. Gradients flow to both.
    """
    if drops is None:
        drops = draw_drops(x.numel(), p, x.device)
    return _DroppedLinear.apply(x, weight, drops, 1.0 / (1.0 - p))
