"""The training objective: cross-entropy over response tokens only (prompt and pad positions unscored).

Where the model's head allows it the head and the loss run fused (``fast.head_loss``): the same loss
without materialising the logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from oloraplus.data.batching import IGNORE
from oloraplus.fast.head_loss import fusable_head, head_cross_entropy, head_inputs


def response_positions(labels) -> tuple[torch.Tensor, torch.Tensor]:
    """The positions that predict a response token (position t predicts token t+1), and those tokens."""
    keep = labels[:, 1:] != IGNORE
    keep = torch.cat([keep, torch.zeros_like(keep[:, :1])], dim=1)
    return keep, labels[:, 1:][keep[:, :-1]]


def response_logits(model, input_ids, attention_mask, labels) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits at the positions that predict a response token, and those tokens.

    Returns ``(logits, targets)`` of shapes (N, vocab) and (N,), N = number of response tokens.
    """
    keep, targets = response_positions(labels)
    out = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep, use_cache=False)
    logits = out.logits
    if logits.dim() == 3:  # a model that ignores a boolean logits_to_keep
        logits = logits[keep]
    return logits, targets


def response_loss(model, input_ids, attention_mask, labels, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy (fp32) over response tokens only.

    Where the model's head allows it (``loss.fusable_head``), the head and the loss run fused,
    chunk by chunk (``loss.HeadCrossEntropy``): the same loss, without materialising the logits.
    """
    head = fusable_head(model)
    if head is None:
        logits, targets = response_logits(model, input_ids, attention_mask, labels)
        return F.cross_entropy(logits.float(), targets, reduction=reduction)
    keep, targets = response_positions(labels)
    with head_inputs(head) as captured:
        model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep, use_cache=False)
    hidden = captured[-1]
    if hidden.dim() == 3:  # a model that ignores a boolean logits_to_keep
        hidden = hidden[keep]
    return head_cross_entropy(model, head, hidden, targets, reduction)
