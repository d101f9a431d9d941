"""The fused head + cross-entropy (``fast.head_loss.HeadCrossEntropy``) against the plain path.

References: ``F.cross_entropy`` over the model's own logits at the response positions
(``method.loss`` with ``fast=False``, and its autograd gradients), and the Hugging Face model's
own ``labels=`` loss.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import make_records, tiny_model

from oloraplus.data.batching import collate
from oloraplus.data.tokenize import tokenize_records
from oloraplus.evaluation.evaluate import eval_loss
from oloraplus.fast import head_loss as loss_module
from oloraplus.fast.head_loss import fusable_head
from oloraplus.fast.precision import prepare_for_compute
from oloraplus.method.adapters import OLoRAPlusConfig, apply_olora
from oloraplus.method.loss import response_logits, response_loss
from oloraplus.training.runtime import autocast


@pytest.fixture
def batch(tiny_tokenizer):
    kept, _ = tokenize_records(make_records(6), tiny_tokenizer, max_length=256)
    return collate(kept, tiny_tokenizer.pad_token_id)


def peft_model(family, tokenizer, softcap=None):
    model = tiny_model(family, vocab_size=len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    if softcap is not None:
        model.config.final_logit_softcapping = softcap
    return apply_olora(model, OLoRAPlusConfig(rank=4)).eval()  # eval: OPT's dropout would differ per pass


def plain_loss(model, batch, reduction="mean"):
    logits, targets = response_logits(model, **batch, fast=False)  # every position's logits, rows selected
    return F.cross_entropy(logits.float(), targets, reduction=reduction)


def loss_and_grads(fn, model):
    loss = fn()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


@pytest.mark.parametrize("family,softcap", [("llama", None), ("opt", None), ("gemma", None), ("gemma", 3.0)])
def test_fused_loss_and_gradients_equal_the_plain_path(family, softcap, tiny_tokenizer, batch, monkeypatch):
    model = peft_model(family, tiny_tokenizer, softcap)
    assert fusable_head(model) is not None
    monkeypatch.setattr(loss_module, "CHUNK_ROWS", 7)  # several chunks, the last one partial
    assert int((batch["labels"] != -100).sum()) > 2 * 7

    fused, fused_grads = loss_and_grads(lambda: response_loss(model, **batch), model)
    plain, plain_grads = loss_and_grads(lambda: plain_loss(model, batch), model)
    hf = model(**batch).loss  # the model's own loss, softcapping included
    torch.testing.assert_close(fused, plain, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fused, hf.detach(), rtol=1e-5, atol=1e-5)
    assert fused_grads.keys() == plain_grads.keys() and len(fused_grads) > 0
    for name, plain_grad in plain_grads.items():  # fp32 rounding, on the scale of each gradient
        atol = 1e-6 * float(plain_grad.abs().max())
        torch.testing.assert_close(fused_grads[name], plain_grad, rtol=1e-4, atol=atol, msg=name)

    summed = response_loss(model, **batch, reduction="sum")
    torch.testing.assert_close(summed, plain_loss(model, batch, reduction="sum"), rtol=1e-6, atol=1e-5)
    # The head computes real logits again afterwards.
    logits = model(input_ids=batch["input_ids"][:1]).logits
    assert logits.shape[-1] == len(tiny_tokenizer)


def test_fused_loss_in_bf16_matches_the_plain_path(tiny_tokenizer, batch):
    model = peft_model("llama", tiny_tokenizer)
    prepare_for_compute(model, "bf16", "cpu")  # frozen weights (and the head) stored in bf16
    with autocast("bf16", "cpu"):
        fused, fused_grads = loss_and_grads(lambda: response_loss(model, **batch), model)
        plain, plain_grads = loss_and_grads(lambda: plain_loss(model, batch), model)
    torch.testing.assert_close(fused, plain, rtol=2e-3, atol=2e-3)
    for name in plain_grads:
        assert fused_grads[name].dtype == plain_grads[name].dtype == torch.float32
        rel = (fused_grads[name] - plain_grads[name]).norm() / plain_grads[name].norm()
        assert rel < 0.05, (name, rel.item())


def test_eval_loss_uses_the_fused_path_without_gradients(tiny_tokenizer, batch):
    model = peft_model("gemma", tiny_tokenizer, softcap=3.0)
    kept, _ = tokenize_records(make_records(6), tiny_tokenizer, max_length=256)
    result = eval_loss(model, kept, tiny_tokenizer.pad_token_id, batch_size=4, progress=False)
    with torch.no_grad():
        total = sum(plain_loss(model, collate(kept[i : i + 4], tiny_tokenizer.pad_token_id), "sum").item()
                    for i in range(0, len(kept), 4))
    assert result["eval_loss"] == pytest.approx(total / result["eval_tokens"], rel=1e-6)


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_eval_loss_is_the_same_on_the_plain_path(family, tiny_tokenizer):
    model = peft_model(family, tiny_tokenizer)
    kept, _ = tokenize_records(make_records(6), tiny_tokenizer, max_length=256)
    fast = eval_loss(model, kept, tiny_tokenizer.pad_token_id, batch_size=4, progress=False)
    plain = eval_loss(model, kept, tiny_tokenizer.pad_token_id, batch_size=4, progress=False, fast=False)
    assert plain["eval_tokens"] == fast["eval_tokens"]
    assert plain["eval_loss"] == pytest.approx(fast["eval_loss"], rel=1e-6)


def test_the_plain_path_touches_no_patch(tiny_tokenizer, batch, monkeypatch):
    import oloraplus.method.loss as method_loss

    def refuse(*args, **kwargs):
        raise AssertionError("a speed patch ran with fast=False")

    model = peft_model("llama", tiny_tokenizer)
    for name in ("fused_response_loss", "kept_logits"):
        monkeypatch.setattr(method_loss, name, refuse)
    logits, targets = response_logits(model, **batch, fast=False)
    assert logits.shape == (len(targets), len(tiny_tokenizer))
    torch.testing.assert_close(response_loss(model, **batch, fast=False), model(**batch).loss, rtol=1e-5, atol=1e-6)


def test_heads_the_fused_path_does_not_take(tiny_tokenizer):
    plain = tiny_model("llama", vocab_size=len(tiny_tokenizer))
    assert fusable_head(plain) is None  # its head is trainable

    class Wrapper(torch.nn.Module):  # DDP-like: the loss must go through the wrapper's forward
        def __init__(self, module):
            super().__init__()
            self.module = module

    model = peft_model("llama", tiny_tokenizer)
    assert fusable_head(Wrapper(model)) is None
    head = fusable_head(model)
    head._hf_hook = object()  # accelerate's offloading: the weight may not be where it looks
    assert fusable_head(model) is None
    del head._hf_hook
    model.get_base_model().config.model_type = "some_new_model"  # logits may be post-processed
    assert fusable_head(model) is None


def test_a_forward_installed_on_the_head_is_restored(tiny_tokenizer, batch):
    model = peft_model("llama", tiny_tokenizer)
    head = fusable_head(model)
    calls = []
    original = head.forward

    def wrapped(x):
        calls.append(1)
        return original(x)

    head.forward = wrapped
    response_loss(model, **batch)
    assert head.__dict__["forward"] is wrapped and not calls  # the fused pass skips it, then puts it back
