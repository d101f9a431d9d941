"""The training attention kernel chosen per batch length: which kernel runs, and that it changes nothing else."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import oloraplus.runtime as runtime
from conftest import make_records
from oloraplus.adapters import apply_olora
from oloraplus.data import tokenize_records
from oloraplus.errors import UserError
from oloraplus.runtime import attention_kernel
from oloraplus.train import TrainConfig, build_trainer


def test_kernel_choice_by_device_and_length():
    limit = runtime.CPU_EAGER_MAX_LENGTH
    assert attention_kernel("auto", "cpu", limit) == "eager"
    assert attention_kernel("auto", "cpu", limit + 1) == "sdpa"
    assert attention_kernel("auto", "cuda", 8) == "sdpa"  # measured on CPU only: GPUs keep SDPA
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
    monkeypatch.setattr(runtime, "CPU_EAGER_MAX_LENGTH", lengths[len(lengths) // 2])  # splits the batches
    model, _ = _train(tiny_checkpoint, tmp_path / "auto", "auto", seen)
    assert {kernel for _, kernel in seen} == {"eager", "sdpa"}
    for length, kernel in seen:
        assert kernel == ("eager" if length <= runtime.CPU_EAGER_MAX_LENGTH else "sdpa")
    assert model.get_base_model().config._attn_implementation == "sdpa"  # evaluation runs as loaded


def test_the_kernel_does_not_change_what_is_learned(tiny_checkpoint, tmp_path):
    _, eager = _train(tiny_checkpoint, tmp_path / "eager", "eager")
    _, sdpa = _train(tiny_checkpoint, tmp_path / "sdpa", "sdpa")
    assert eager.keys() == sdpa.keys()
    for name in eager:
        torch.testing.assert_close(eager[name], sdpa[name], rtol=1e-4, atol=1e-5)
