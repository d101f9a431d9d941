"""The LM head and its cross-entropy in one pass, chunk by chunk (frozen head only).

The plain path materialises fp32 logits for every response token, then runs log-softmax,
NLL and their backward over them, and casts them back: about ten passes over an N x vocab
array (N response tokens), which for a 262k-token vocabulary (Gemma) dominates a batch's memory.
With a frozen head the only gradient needed is the one for the hidden states, and for
softmax cross-entropy it is known in closed form, ``(softmax - onehot) @ W``. So for each chunk
of rows we compute the logits, the loss and that gradient at once, and keep
only the (N x hidden) gradient for the backward pass. The FLOPs are the same (the head forward
and its input gradient); the memory traffic and the peak memory are far smaller. Within a chunk,
the loss comes from ``log_softmax`` and the gradient from one bf16 softmax pass minus the target
rows of W, exactly: fewer passes than log-sum-exp, ``exp_`` and an in-place one-hot, and closer
to fp64 arithmetic. Measured gains and errors: bench/NOTES.md (``bench/head_loss_probe.py``,
``bench/head_passes_probe.py``).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from oloraplus.models.families import FUSABLE_MODEL_TYPES
from oloraplus.models.loading import base_model

# Rows per chunk: large enough that the head weight (vocab x hidden, large for Gemma) is streamed
# once per 256 rows, small enough that a chunk's logits stay bounded: 256 x vocab in bf16, their
# fp32 copy and as much for its log-softmax, and the bf16 softmax, at once.
CHUNK_ROWS = 256


class HeadCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``cap(hidden @ weight.T)`` over ``targets``; ``weight`` frozen.

    Matmuls run in the weight's dtype (bf16 weights: as autocast would run them). The loss is
    computed in fp32, exactly like ``F.cross_entropy(logits.float(), targets)``; the softmax of
    the gradient is computed in fp32 and stored in the weight's dtype for its matmul.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, softcap, chunk):
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device) if ctx.needs_input_grad[0] else None
        for i in range(0, hidden.shape[0], chunk):
            tgt = targets[i : i + chunk]
            logits = F.linear(hidden[i : i + chunk].to(weight.dtype), weight)
            if softcap is not None:
                capped = torch.tanh(logits.float() / softcap)
                logits = capped * softcap
            total -= torch.log_softmax(logits.float(), dim=-1).gather(1, tgt[:, None]).sum()
            if grad is not None:
                # d loss / d logits = softmax - onehot, so d loss / d hidden = softmax @ W - W[targets].
                # Softmax in one pass, fp32 inside and stored in the logits' dtype (the dtype the
                # matmul takes anyway); the one-hot part is W's target rows, exactly.
                p = torch.softmax(logits, dim=-1)
                w_targets = weight[tgt].float()
                if softcap is not None:
                    slope = 1 - capped * capped  # d(cap * tanh(z / cap)) / dz
                    p = p * slope
                    w_targets *= slope.gather(1, tgt[:, None])
                grad[i : i + chunk] = (p.to(weight.dtype) @ weight).float() - w_targets
        ctx.save_for_backward(grad)
        ctx.hidden_dtype = hidden.dtype
        return total

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return (grad * grad_output).to(ctx.hidden_dtype), None, None, None, None


def fusable_head(model) -> torch.nn.Linear | None:
    """The frozen, bias-free output head of a (PEFT-wrapped) model the fused loss can replace.

    None for anything else: an unknown architecture, a trainable or adapted head, or a model
    inside a DDP/FSDP wrapper (the plain path is always correct; this one is only faster).
    """
    base = base_model(model)
    config = getattr(base, "config", None)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if getattr(config, "model_type", None) not in FUSABLE_MODEL_TYPES or type(head) is not torch.nn.Linear:
        return None
    if head.bias is not None or head.weight.requires_grad or hasattr(head, "_hf_hook"):
        return None  # a bias, a trainable head, or accelerate's offloading hooks: plain path
    return head


@contextlib.contextmanager
def head_inputs(head: torch.nn.Linear):
    """Within the block, ``head`` records its input and returns zero-width logits."""
    captured: list[torch.Tensor] = []

    def forward(x):
        captured.append(x)
        return x.new_empty(*x.shape[:-1], 0)

    previous = head.__dict__.get("forward")  # an instance-level forward someone else installed
    head.forward = forward
    try:
        yield captured
    finally:
        if previous is None:
            del head.forward
        else:
            head.forward = previous


def fused_response_loss(model, input_ids, attention_mask, keep, targets,
                        reduction: str = "mean") -> torch.Tensor | None:
    """Cross-entropy at the ``True`` positions of ``keep`` against ``targets``, head and loss fused.

    None where the head is not fusable (:func:`fusable_head`): the caller computes the logits.
    The model runs with the boolean ``keep`` as ``logits_to_keep`` (``fast.logits_mask``), so the
    head's captured input is the (N x hidden) rows to score.
    """
    head = fusable_head(model)
    if head is None:
        return None
    with head_inputs(head) as captured:
        model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep, use_cache=False)
    hidden = captured[-1]
    if hidden.dim() == 3:  # a model that ignores a boolean logits_to_keep
        hidden = hidden[keep]
    return head_cross_entropy(model, head, hidden, targets, reduction)


def head_cross_entropy(model, head, hidden, targets, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of ``head``'s logits at ``hidden`` (N x d) against ``targets`` (N,)."""
    base = base_model(model)
    softcap = getattr(base.config, "final_logit_softcapping", None)
    total = HeadCrossEntropy.apply(hidden, head.weight, targets, softcap, CHUNK_ROWS)
    return total / max(len(targets), 1) if reduction == "mean" else total
