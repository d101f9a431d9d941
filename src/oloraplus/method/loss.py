"""The training objective: cross-entropy over response tokens only (prompt and pad positions unscored).

Two paths compute the same loss. ``fast=True`` (the default) takes the speed patches of
``oloraplus.fast``: the LM head only at response positions (``fast.logits_mask``) and, where the
model's head allows it, the head and the loss fused without materialising the logits
(``fast.head_loss``). ``fast=False`` is the plain path: the model's logits at every position,
then the response rows selected; nothing in ``oloraplus.fast`` runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from oloraplus.data.batching import IGNORE
from oloraplus.fast.head_loss import fused_response_loss
from oloraplus.fast.logits_mask import kept_logits


def response_positions(labels) -> tuple[torch.Tensor, torch.Tensor]:
    """The positions that predict a response token (position t predicts token t+1), and those tokens."""
    keep = labels[:, 1:] != IGNORE
    keep = torch.cat([keep, torch.zeros_like(keep[:, :1])], dim=1)
    return keep, labels[:, 1:][keep[:, :-1]]


def response_logits(model, input_ids, attention_mask, labels, fast: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits at the positions that predict a response token, and those tokens.

    Returns ``(logits, targets)`` of shapes (N, vocab) and (N,), N = number of response tokens.
    ``fast=False``: every position's logits are computed and the response rows selected.
    """
    keep, targets = response_positions(labels)
    if fast:
        return kept_logits(model, input_ids, attention_mask, keep), targets
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    return logits[keep], targets


def response_loss(model, input_ids, attention_mask, labels, reduction: str = "mean", fast: bool = True) -> torch.Tensor:
    """Cross-entropy (fp32) over response tokens only.

    With ``fast`` and a head that allows it (``fast.head_loss.fusable_head``), the head and the
    loss run fused, chunk by chunk: the same loss, without materialising the logits.
    """
    if fast:
        keep, targets = response_positions(labels)
        loss = fused_response_loss(model, input_ids, attention_mask, keep, targets, reduction)
        if loss is not None:
            return loss
    logits, targets = response_logits(model, input_ids, attention_mask, labels, fast=fast)
    return F.cross_entropy(logits.float(), targets, reduction=reduction)
