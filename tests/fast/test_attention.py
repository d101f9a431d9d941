"""The training attention kernel chosen per batch length: which kernel runs, and that it changes nothing else.

References for the grouped kernel: transformers' own eager attention (Llama's, Gemma 2's with
soft-capping, OPT's), on the same tensors and through whole tiny models, forward and backward.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import make_records, tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer

import oloraplus.fast.attention as attention
from oloraplus.data.batching import collate
from oloraplus.data.tokenize import tokenize_records
from oloraplus.errors import UserError
from oloraplus.fast.attention import GROUPED, attention_kernel, grouped_eager_attention, use_attention
from oloraplus.method.adapters import OLoRAPlusConfig, apply_olora
from oloraplus.method.loss import response_loss
from oloraplus.training.config import TrainConfig
from oloraplus.training.recipe import build_trainer


def test_kernel_choice_by_device_and_length():
    limit = attention.CPU_EAGER_MAX_LENGTH
    assert attention_kernel("auto", "cpu", limit) == GROUPED
    assert attention_kernel("auto", "cpu", limit + 1) == "sdpa"
    assert attention_kernel("auto", "cuda", 8) == "sdpa"  # measured on CPU only: GPUs keep SDPA
    assert attention_kernel("grouped", "cuda", 10_000) == GROUPED
    assert attention_kernel("eager", "cpu", 10_000) == "eager"
    assert attention_kernel("sdpa", "cpu", 8) == "sdpa"
    with pytest.raises(UserError, match="attention must be one of"):
        attention_kernel("flash", "cpu", 8)
    with pytest.raises(UserError, match="unknown attention"):
        TrainConfig(output="x", method="olora", attention="flash").validate()


def _train(checkpoint: Path, out: Path, attention: str, seen: list | None = None):
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    examples, _ = tokenize_records(make_records(16), tokenizer, max_length=64)
    config = TrainConfig(output=str(out), method="olora-plus", ratio=4.0, rank=4, batch_size=4, max_steps=4,
                         lr=5e-3, progress=False, seed=1, attention=attention)
    torch.manual_seed(0)
    model = apply_olora(AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32), config.adapter_config())
    trainer = build_trainer(config, model, tokenizer, examples, out, "fp32", "cpu")
    if seen is not None:
        attention_module = model.get_base_model().model.layers[0].self_attn
        hook = attention_module.register_forward_pre_hook(
            lambda m, args, kwargs: seen.append((kwargs["hidden_states"].shape[1], m.config._attn_implementation)),
            with_kwargs=True)
    trainer.train()
    if seen is not None:
        hook.remove()
    state = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    return model, state


def test_auto_uses_eager_for_short_batches_sdpa_for_long_and_restores_the_kernel(tiny_checkpoint, tmp_path, monkeypatch):
    seen: list = []
    lengths = sorted({len(e.input_ids) for e in tokenize_records(make_records(16), AutoTokenizer.from_pretrained(tiny_checkpoint), 64)[0]})
    monkeypatch.setattr(attention, "CPU_EAGER_MAX_LENGTH", lengths[len(lengths) // 2])  # splits the batches
    model, _ = _train(tiny_checkpoint, tmp_path / "auto", "auto", seen)
    assert {kernel for _, kernel in seen} == {GROUPED, "sdpa"}
    for length, kernel in seen:
        assert kernel == (GROUPED if length <= attention.CPU_EAGER_MAX_LENGTH else "sdpa")
    assert model.get_base_model().config._attn_implementation == "sdpa"  # evaluation runs as loaded


@pytest.mark.parametrize("other", ["sdpa", "grouped"])
def test_the_kernel_does_not_change_what_is_learned(tiny_checkpoint, tmp_path, other):
    _, eager = _train(tiny_checkpoint, tmp_path / "eager", "eager")
    _, learned = _train(tiny_checkpoint, tmp_path / other, other)
    assert eager.keys() == learned.keys()
    for name in eager:
        torch.testing.assert_close(eager[name], learned[name], rtol=1e-4, atol=1e-5)


def _qkv(b=2, h=6, hkv=2, t=7, s=7, d=8, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, n, length, d, generator=g).to(dtype).requires_grad_()
               for n, length in ((h, t), (hkv, s), (hkv, s)))
    mask = torch.zeros(b, 1, t, s)
    mask[:, :, :, : s - t] = 0.0
    mask[:, :, torch.triu_indices(t, t, 1)[0], (s - t) + torch.triu_indices(t, t, 1)[1]] = torch.finfo(dtype).min
    mask[1, :, :, :2] = torch.finfo(dtype).min  # the second row is left-padded by two
    return q, k, v, mask.to(dtype)


class _Module(torch.nn.Module):
    def __init__(self, h, hkv, d):
        super().__init__()
        self.num_key_value_groups, self.head_dim = h // hkv, d


@pytest.mark.parametrize("shape", [dict(h=6, hkv=2), dict(h=4, hkv=4), dict(h=4, hkv=1, t=1, s=9)])
@pytest.mark.parametrize("softcap", [None, 5.0])
def test_grouped_kernel_equals_transformers_eager_attention(shape, softcap):
    from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward

    q, k, v, mask = _qkv(**shape)
    module = _Module(q.shape[1], k.shape[1], q.shape[-1]).eval()
    grad = torch.randn(q.shape[0], q.shape[2], q.shape[1], q.shape[3])
    results = []
    for kernel in (eager_attention_forward, grouped_eager_attention):
        out, weights = kernel(module, q, k, v, mask, scaling=0.3, softcap=softcap)
        out.backward(grad)
        results.append((out.detach(), weights.detach(), *(x.grad.clone() for x in (q, k, v))))
        for x in (q, k, v):
            x.grad = None
    for ours, theirs in zip(results[1], results[0]):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_grouped_kernel_in_bf16_is_as_close_to_fp32_as_the_eager_kernel():
    from transformers.models.llama.modeling_llama import eager_attention_forward

    q, k, v, mask = _qkv(b=4, h=9, hkv=3, t=40, s=40, d=64)
    mask = mask.clamp(min=torch.finfo(torch.bfloat16).min)  # fp32's minimum would round to -inf in bf16
    module = _Module(9, 3, 64).eval()
    exact = eager_attention_forward(module, q.double(), k.double(), v.double(), mask.double(), scaling=0.125)[0]
    low = [x.detach().bfloat16() for x in (q, k, v, mask)]
    errors = {kernel.__module__: (kernel(module, *low, scaling=0.125)[0].double() - exact).norm() / exact.norm()
              for kernel in (eager_attention_forward, grouped_eager_attention)}
    ours, theirs = errors["oloraplus.fast.attention"], errors[eager_attention_forward.__module__]
    assert ours < 1e-2 and ours <= 1.1 * theirs, errors


@pytest.mark.parametrize("family", ["llama", "gemma", "opt"])
def test_grouped_kernel_in_a_model_gives_eager_loss_and_gradients(family, tiny_tokenizer):
    model = tiny_model(family, vocab_size=len(tiny_tokenizer))
    model.config.pad_token_id = tiny_tokenizer.pad_token_id
    model = apply_olora(model, OLoRAPlusConfig(rank=4)).eval()
    kept, _ = tokenize_records(make_records(6), tiny_tokenizer, max_length=256)
    batch = collate(kept, tiny_tokenizer.pad_token_id)
    results = {}
    for kernel in ("eager", GROUPED):
        use_attention(model, kernel)
        loss = response_loss(model, **batch)
        loss.backward()
        results[kernel] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        model.zero_grad(set_to_none=True)
    assert model.get_base_model().config._attn_implementation == GROUPED
    torch.testing.assert_close(results[GROUPED][0], results["eager"][0], rtol=1e-6, atol=1e-6)
    assert results[GROUPED][1].keys() == results["eager"][1].keys()
    for name, grad in results["eager"][1].items():
        torch.testing.assert_close(results[GROUPED][1][name], grad, rtol=1e-4, atol=1e-6)
