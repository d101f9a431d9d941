"""``oloraplus.fast.dropout``: LoRA's input dropout from a list of dropped positions is PEFT's dropout.

The same function as PEFT's ``lora_dropout`` path given the same mask (output and gradients), the
same distribution of masks (fraction, positions, pairs, a fresh mask per module and call, the
mean output), exactly the no-dropout output in eval mode and at p = 0, and never used by the
plain path (``--no-fast``).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import tiny_model

import oloraplus.fast.addmm as fast_addmm
import oloraplus.fast.dropout as fast_dropout
from oloraplus.fast.addmm import use_addmm_lora
from oloraplus.fast.dropout import draw_drops, dropout_lora_a
from oloraplus.method.adapters import OLoRAPlusConfig, apply_olora


def lora_layers(model):
    from peft.tuners.lora.layer import Linear as LoraLinear

    return [m for m in model.modules() if isinstance(m, LoraLinear)]


def within(count: float, n: int, p: float, sigmas: float = 5.0) -> bool:
    """``count`` successes of ``n`` Bernoulli(p) trials is within ``sigmas`` binomial standard deviations."""
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p))


class MaskedDropout(torch.nn.Module):
    """PEFT's dropout module with its mask fixed: ``F.dropout``'s CPU arithmetic, ``x * (keep / (1 - p))``."""

    def __init__(self, keep: torch.Tensor, p: float):
        super().__init__()
        self.keep, self.p = keep, p

    def forward(self, x):
        return x * (self.keep.view_as(x).to(x.dtype) / (1 - self.p))


class DrawSpy:
    """Records every mask :func:`draw_drops` draws (patched into ``oloraplus.fast.dropout``)."""

    def __init__(self, monkeypatch, fixed: torch.Tensor | None = None):
        self.masks = []
        self.fixed = fixed
        monkeypatch.setattr(fast_dropout, "draw_drops", self)

    def __call__(self, numel, p, *args, **kwargs):
        drops = self.fixed if self.fixed is not None else draw_drops(numel, p, *args, **kwargs)
        self.masks.append((numel, drops))
        return drops


def fast_and_plain(p: float, dtype=torch.float32):
    """A tiny Llama with OLoRA adapters and lora dropout p, in train mode: (fast copy, plain copy)."""
    plain = apply_olora(tiny_model("llama", dtype=dtype), OLoRAPlusConfig(rank=4, dropout=p)).train()
    fast = copy.deepcopy(plain)
    assert use_addmm_lora(fast) == 14
    return fast, plain


# (a) the same function as PEFT's dropout path, given the same mask ----------------------------


@pytest.mark.parametrize("shape", [(2, 5), (7,)])
def test_same_output_and_gradients_as_peft_given_the_same_mask(monkeypatch, shape):
    """fp32, equal to 1e-6 of each tensor's largest magnitude: the two paths round differently (PEFT
    scales each input element by 1 / (1 - p), fast.dropout the r-wide product), nothing more."""
    dtype, eps = torch.float32, 1e-6
    p = 0.3
    fast_model, plain_model = fast_and_plain(p, dtype)
    fast, plain = lora_layers(fast_model)[0], lora_layers(plain_model)[0]
    torch.manual_seed(1)
    b = 0.3 * torch.randn_like(fast.lora_B["default"].weight)
    with torch.no_grad():  # B = 0 would hide A's gradient and the LoRA path's share of x's
        for layer in (fast, plain):
            layer.lora_B["default"].weight.copy_(b)
    x = torch.randn(*shape, fast.in_features, dtype=dtype)
    drops = draw_drops(x.numel(), p, generator=torch.Generator().manual_seed(3))
    assert 0 < drops.numel() < x.numel()
    keep = torch.ones(x.numel(), dtype=dtype)
    keep[drops] = 0
    spy = DrawSpy(monkeypatch, fixed=drops)
    plain.lora_dropout["default"] = MaskedDropout(keep, p)

    outputs, grads = [], []
    for layer in (fast, plain):
        xi = x.clone().requires_grad_()
        out = layer(xi)
        out.backward(torch.linspace(-1, 1, out.numel(), dtype=dtype).view_as(out))
        outputs.append(out)
        grads.append([xi.grad, layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad])
    assert len(spy.masks) == 1, "the fast layer did not draw its mask through fast.dropout"
    for name, got, want in zip(("output", "gradient of x", "gradient of A", "gradient of B"),
                               [outputs[0], *grads[0]], [outputs[1], *grads[1]]):
        error, size = (got - want).abs().max().item(), want.abs().max().item()
        assert error <= eps * size, f"{name}: off by {error:.3g} at magnitude {size:.3g}"
    with torch.no_grad():  # the mask matters, so the comparison means something
        assert not torch.allclose(outputs[0], _without_dropout(fast)(x), atol=1e-3)


def _without_dropout(layer):
    clone = copy.deepcopy(layer)
    clone.lora_dropout["default"] = torch.nn.Identity()
    return clone


def test_same_output_as_peft_under_bf16_autocast(monkeypatch):
    """Under bf16 autocast (the fast path's bf16 inputs) the operands are cast like ``lora_a``'s own matmul."""
    p = 0.1
    fast_model, plain_model = fast_and_plain(p)
    fast, plain = lora_layers(fast_model)[0], lora_layers(plain_model)[0]
    b = 0.3 * torch.randn(fast.lora_B["default"].weight.shape, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        for layer in (fast, plain):
            layer.lora_B["default"].weight.copy_(b)
    fast.cast_input_dtype_enabled = False
    x = torch.randn(3, 9, fast.in_features).to(torch.bfloat16)
    drops = draw_drops(x.numel(), p)
    keep = torch.ones(x.numel())
    keep[drops] = 0
    DrawSpy(monkeypatch, fixed=drops)
    plain.lora_dropout["default"] = MaskedDropout(keep, p)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = fast(x) - fast.base_layer(x)
        ref = plain(x) - plain.base_layer(x)
    assert ours.dtype == torch.bfloat16
    torch.testing.assert_close(ours.float(), ref.float(), rtol=0.03, atol=0.05)
    assert not torch.allclose(ours.float(), ref.float() * (1 - p), rtol=0.03, atol=0.05)


# (b) the same distribution ---------------------------------------------------------------------


@pytest.mark.parametrize("p", [0.05, 0.3, 0.9])
def test_dropped_fraction_is_p(p):
    n = 2_000_000
    drops = draw_drops(n, p)
    assert drops.dtype == torch.int64 and bool((drops.diff() > 0).all()), "positions not sorted and distinct"
    assert int(drops[0]) >= 0 and int(drops[-1]) < n
    assert within(drops.numel(), n, p), f"dropped {drops.numel()} of {n} at p = {p}"


@pytest.mark.parametrize("block", [None, 2])
def test_each_position_and_pair_dropped_independently(block):
    """Per position P(dropped) = p and per adjacent pair p^2, also when gaps are drawn in several blocks."""
    p, numel, draws = 0.3, 12, 20000
    masks = torch.zeros(draws, numel, dtype=torch.bool)
    for row in masks:
        row[draw_drops(numel, p, block=block)] = True
    for pos in range(numel):
        assert within(int(masks[:, pos].sum()), draws, p), f"position {pos}: {int(masks[:, pos].sum())} / {draws}"
    for pos in range(numel - 1):
        pairs = int((masks[:, pos] & masks[:, pos + 1]).sum())
        assert within(pairs, draws, p * p), f"pair {pos}: {pairs} / {draws}"
    counts = masks.sum(1).double()
    assert abs(counts.var().item() - numel * p * (1 - p)) < 0.1 * numel * p * (1 - p), "drops per mask not binomial"


def test_a_generator_fixes_the_mask_and_advances():
    g = torch.Generator().manual_seed(7)
    first, second = draw_drops(5000, 0.1, generator=g), draw_drops(5000, 0.1, generator=g)
    again = draw_drops(5000, 0.1, generator=torch.Generator().manual_seed(7))
    assert torch.equal(first, again) and not torch.equal(first, second)


def test_kept_values_scaled_and_dropped_ones_zero():
    p, n, d = 0.2, 4000, 16
    out = dropout_lora_a(torch.ones(n, d), torch.eye(d), p)  # identity A: the dropped input itself
    values = out.unique()
    torch.testing.assert_close(values, torch.tensor([0.0, 1 / (1 - p)]), rtol=0, atol=1e-7)
    assert within(int((out == 0).sum()), n * d, p)


def test_a_fresh_mask_per_module_and_per_call(monkeypatch):
    fast, _ = fast_and_plain(0.1)
    spy = DrawSpy(monkeypatch)
    ids = torch.randint(0, 320, (2, 6))
    first = fast(input_ids=ids).logits
    assert len(spy.masks) == 14, f"{len(spy.masks)} masks drawn for 14 LoRA layers"
    second = fast(input_ids=ids).logits
    assert len(spy.masks) == 28
    assert all(numel == 2 * 6 * 64 or numel == 2 * 6 * 128 for numel, _ in spy.masks)
    distinct = {tuple(drops.tolist()) for _, drops in spy.masks}
    assert len(distinct) == 28, "two modules or two calls shared a mask"
    assert not torch.equal(first, second)


def test_mean_output_is_the_no_dropout_output():
    p, calls = 0.3, 3000
    fast, _ = fast_and_plain(p)
    layer = lora_layers(fast)[0]
    torch.manual_seed(2)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
        x = torch.randn(4, layer.in_features)
        target = layer.eval()(x)
        layer.train()
        outs = torch.stack([layer(x) for _ in range(calls)])
    error = (outs.mean(0) - target).abs()
    bound = 5 * outs.std(0) / math.sqrt(calls) + 1e-5
    assert bool((error <= bound).all()), f"mean output off by {(error / bound).max():.2f} bounds"
    assert bool((outs.std(0) > 0).all())


# (c) the identity where PEFT's dropout is -------------------------------------------------------


def _no_dropout(model):
    clone = copy.deepcopy(model)
    for layer in lora_layers(clone):
        layer.lora_dropout["default"] = torch.nn.Identity()
    return clone


def test_eval_mode_and_p_zero_are_exactly_no_dropout(monkeypatch):
    spy = DrawSpy(monkeypatch)
    ids = torch.randint(0, 320, (2, 6))
    fast, _ = fast_and_plain(0.3)
    reference = _no_dropout(fast)
    fast.eval()
    reference.eval()
    with torch.no_grad():
        assert torch.equal(fast(input_ids=ids).logits, reference(input_ids=ids).logits)
    fast.train()
    reference.train()
    for layer in lora_layers(fast):
        layer.lora_dropout["default"] = torch.nn.Dropout(0.0)
    assert torch.equal(fast(input_ids=ids).logits, reference(input_ids=ids).logits)
    assert spy.masks == [], "a mask was drawn in eval mode or at p = 0"
    for layer in lora_layers(fast):
        layer.lora_dropout["default"] = torch.nn.Dropout(0.3)
    assert not torch.equal(fast(input_ids=ids).logits, reference(input_ids=ids).logits) and len(spy.masks) == 14


# (d) not on the plain path ----------------------------------------------------------------------


def test_plain_path_never_uses_fast_dropout(monkeypatch):
    """fast=False: PEFT's own dropout runs, and nothing of fast.dropout (also through the CLI, below)."""
    def refuse(*args, **kwargs):
        raise AssertionError("fast.dropout ran on the plain path")

    monkeypatch.setattr(fast_dropout, "draw_drops", refuse)
    monkeypatch.setattr(fast_dropout, "dropout_lora_a", refuse)
    monkeypatch.setattr(fast_addmm, "dropout_lora_a", refuse)
    _, plain = fast_and_plain(0.3)
    calls = []
    for layer in lora_layers(plain):
        layer.lora_dropout["default"].register_forward_hook(lambda m, args, out: calls.append(m.p))
    plain(input_ids=torch.randint(0, 320, (2, 6))).logits.sum().backward()
    assert calls == [0.3] * 14


def test_cli_trains_with_dropout_fast_and_not_plain(tmp_path, tiny_checkpoint, records_file, monkeypatch):
    """``--dropout 0.1``: the default (fast) run draws through fast.dropout, ``--no-fast`` never does."""
    from oloraplus.cli import main
    from oloraplus.training import recipe

    monkeypatch.setattr(recipe, "default_device", lambda: "cpu")
    spy = DrawSpy(monkeypatch)
    common = ["train", "--model", str(tiny_checkpoint), "--data", str(records_file), "--n-train", "8", "--n-eval",
              "3", "--max-new-tokens", "2", "--precision", "fp32", "--no-progress", "--method", "olora-plus",
              "--ratio", "4", "--rank", "4", "--batch-size", "4", "--max-steps", "2", "--dropout", "0.1"]
    assert main([*common, "--no-fast", "--output", str(tmp_path / "plain")]) == 0
    assert spy.masks == [], "fast.dropout ran with --no-fast"
    assert main([*common, "--output", str(tmp_path / "fast")]) == 0
    assert len(spy.masks) >= 2 * 14, f"{len(spy.masks)} masks in two fast steps of 14 LoRA layers"
