"""Speed patch: the LM head only at the positions that are scored (a boolean ``logits_to_keep``).

transformers' causal LMs slice their last hidden states with ``logits_to_keep`` before the head
(``modeling_utils.slice_logits_to_keep``); a 2-D boolean mask (batch x sequence) keeps the
``True`` positions and flattens them to (N x hidden). Passing the mask of response positions
means prompt and pad positions never reach the vocabulary projection, the largest single cost
for a large vocabulary. The plain path (``method.loss`` with ``fast=False``) computes every
position's logits and selects the same rows afterwards: the same function.
"""

from __future__ import annotations

import torch


def kept_logits(model, input_ids, attention_mask, keep: torch.Tensor) -> torch.Tensor:
    """The logits at the ``True`` positions of ``keep`` (batch x sequence, bool), shape (N, vocab)."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep, use_cache=False)
    logits = out.logits
    if logits.dim() == 3:  # a model that ignores a boolean logits_to_keep: select the rows here
        logits = logits[keep]
    return logits
