"""A checkpoint stored in bf16 is loaded in bf16 by --fast bf16 training: the same function as loading it
in fp32 (the adapter init upcasts W; the frozen weights end in bf16 either way), at half the load memory."""

import os

import pytest
import torch
from conftest import tiny_model

from oloraplus.fast.precision import prepare_for_compute
from oloraplus.method.adapters import OLoRAPlusConfig, apply_adapters
from oloraplus.models.loading import load_model, stored_float_dtypes
from oloraplus.training.config import TrainConfig
from oloraplus.training.recipe import load_base_model


def save(path, tokenizer, family="llama", dtype=torch.bfloat16):
    model = tiny_model(family, dtype=dtype)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_stored_float_dtypes_reads_the_safetensors_headers(tmp_path, tiny_tokenizer):
    assert stored_float_dtypes(str(save(tmp_path / "bf16", tiny_tokenizer))) == {torch.bfloat16}
    assert stored_float_dtypes(str(save(tmp_path / "fp32", tiny_tokenizer, dtype=torch.float32))) == {torch.float32}
    (tmp_path / "empty").mkdir()
    assert stored_float_dtypes(str(tmp_path / "empty")) == set()
    assert stored_float_dtypes("nobody-here/not-cached") == set()  # a hub id that is not in the cache


def test_bf16_if_stored_keeps_an_fp32_checkpoint_in_fp32(tmp_path, tiny_tokenizer):
    path = save(tmp_path / "fp32", tiny_tokenizer, dtype=torch.float32)
    model, _ = load_model(str(path), bf16_if_stored=True)
    assert {p.dtype for p in model.parameters()} == {torch.float32}


@pytest.mark.parametrize("family", ["llama", "gemma"])
@pytest.mark.parametrize("init", ["olora", "pissa"])
def test_bf16_load_trains_the_same_function_as_fp32_load(tmp_path, tiny_tokenizer, family, init):
    path = str(save(tmp_path / family, tiny_tokenizer, family))
    runs = []
    for bf16_load in (False, True):
        model, _ = load_model(path, bf16_if_stored=bf16_load)
        assert {p.dtype for p in model.parameters()} == {torch.bfloat16 if bf16_load else torch.float32}
        model = apply_adapters(model, OLoRAPlusConfig(rank=4, alpha=8, init=init))
        prepare_for_compute(model, "bf16", "cpu")
        ids = torch.randint(4, 300, (2, 12), generator=torch.Generator().manual_seed(0))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(input_ids=ids).logits
        logits.float().logsumexp(-1).sum().backward()
        runs.append((model, logits.detach()))
    (fp32_model, fp32_logits), (bf16_model, bf16_logits) = runs
    assert torch.equal(fp32_logits, bf16_logits)
    fp32_params, bf16_params = dict(fp32_model.named_parameters()), dict(bf16_model.named_parameters())
    assert fp32_params.keys() == bf16_params.keys()
    for name, p in fp32_params.items():
        q = bf16_params[name]
        assert p.dtype == q.dtype and torch.equal(p, q), name
        if p.requires_grad:
            assert torch.equal(p.grad, q.grad), name


@pytest.mark.parametrize("method, precision, fast, expected", [
    ("olora", "bf16", True, torch.bfloat16),
    ("olora-plus", "bf16", True, torch.bfloat16),
    ("lora", "bf16", True, torch.float32),  # PEFT would draw A_0 in fp32 and round it to the base's bf16
    ("olora", "fp32", True, torch.float32),
    ("olora", "bf16", False, torch.float32),  # --no-fast: the plain PEFT + Trainer path, fp32 weights
])
def test_load_base_model_loads_bf16_only_where_the_function_is_the_same(
        tmp_path, tiny_tokenizer, method, precision, fast, expected):
    path = str(save(tmp_path / "ckpt", tiny_tokenizer))
    config = TrainConfig(output=str(tmp_path / "out"), model=path, method=method, precision=precision, fast=fast)
    model, _, _ = load_base_model(config, "cpu")
    assert {p.dtype for p in model.parameters()} == {expected}


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads /proc/self/maps (Linux)")
def test_bf16_load_keeps_no_view_of_the_memory_mapped_file(tmp_path, tiny_tokenizer):
    # a view would keep every page of the file it ever touched in the process, weights replaced by the
    # init included, for as long as the model lives
    path = save(tmp_path / "bf16", tiny_tokenizer)
    model, _ = load_model(str(path), bf16_if_stored=True)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert str((path / "model.safetensors").resolve()) not in open("/proc/self/maps").read()
