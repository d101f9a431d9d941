"""``oloraplus export``: an OLoRA or PiSSA adapter as a standard LoRA adapter, or merged into the model.

The reference for "the fine-tuned model" is the OLoRA (PiSSA) model itself, after (simulated)
training, and plain ``PeftModel.from_pretrained`` of the saved adapter on the original base
(PEFT re-runs the OLoRA or PiSSA init there). Every export must reproduce its logits in fp32.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_records
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from oloraplus.cli import main
from oloraplus.data.batching import collate
from oloraplus.data.tokenize import tokenize_records
from oloraplus.method.adapters import OLoRAPlusConfig, apply_olora

TOL = 1e-4


def _base(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _logits(model, batch) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


@pytest.fixture
def batch(tiny_checkpoint):
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    examples, _ = tokenize_records(make_records(4), tokenizer, max_length=64)
    return collate(examples, tokenizer.pad_token_id)


def _trained_adapter(checkpoint, folder, init: str = "olora", seed: int = 1):
    """An adapter whose A and B moved away from their start, as training moves them."""
    model = apply_olora(_base(checkpoint), OLoRAPlusConfig(rank=4, alpha=8, init=init))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.add_(0.1 * torch.randn(param.shape, generator=generator))
    model.save_pretrained(folder)
    return model


def _export(checkpoint, adapter, to, out, capsys) -> None:
    code = main(["export", "--model", str(checkpoint), "--adapter", str(adapter), "--to", to, "--output", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert str(out) in captured.out


@pytest.mark.parametrize("init", ["olora", "pissa"])
def test_lora_export_reproduces_the_finetuned_model_on_the_untouched_base(tiny_checkpoint, tmp_path, batch, capsys,
                                                                          init):
    finetuned = _trained_adapter(tiny_checkpoint, tmp_path / "adapter", init=init)
    expected = _logits(finetuned, batch)
    original = _logits(_base(tiny_checkpoint), batch)
    assert (expected - original).abs().max() > 0.1  # the adapter changed the model
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["init_lora_weights"] == init
    # Plain PEFT on the original base (re-runs the OLoRA/PiSSA init, mutating that base) is the
    # same fine-tuned model.
    loaded = PeftModel.from_pretrained(_base(tiny_checkpoint), str(tmp_path / "adapter"))
    with loaded.disable_adapter():
        assert (_logits(loaded, batch) - original).abs().max() > 0.1, "PEFT left the base unchanged"
    reference = _logits(loaded, batch)
    torch.testing.assert_close(reference, expected, rtol=0, atol=TOL)

    _export(tiny_checkpoint, tmp_path / "adapter", "lora", tmp_path / "lora", capsys)
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["init_lora_weights"]) == (8, 16, True)

    # A standard LoRA adapter that shares the same base.
    other_dir = tmp_path / "other"
    other = get_peft_model(_base(tiny_checkpoint), LoraConfig(r=2, target_modules=["q_proj", "v_proj"],
                                                               init_lora_weights=False))
    other.save_pretrained(other_dir)
    other_expected = _logits(other, batch)

    shared = PeftModel.from_pretrained(_base(tiny_checkpoint), str(tmp_path / "lora"), adapter_name="exported")
    shared.load_adapter(str(other_dir), adapter_name="other")
    shared.set_adapter("exported")
    torch.testing.assert_close(_logits(shared, batch), expected, rtol=0, atol=TOL)
    torch.testing.assert_close(_logits(shared, batch), reference, rtol=0, atol=TOL)
    with shared.disable_adapter():  # the base under the adapters is the original, bit for bit
        assert torch.equal(_logits(shared, batch), original)
    shared.set_adapter("other")
    torch.testing.assert_close(_logits(shared, batch), other_expected, rtol=0, atol=1e-5)


def _olora_start(weight: torch.Tensor, rank: int, scale: float) -> torch.Tensor:
    """B_0 A_0 under OLoRA: the projection of W on its first r columns (full QR, as PEFT does)."""
    q, _ = torch.linalg.qr(weight)
    return q[:, :rank] @ q[:, :rank].T @ weight


def _pissa_start(weight: torch.Tensor, rank: int, scale: float) -> torch.Tensor:
    """B_0 A_0 under PiSSA: W's best rank-r approximation U_r S_r V_r^T, divided by s."""
    u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
    return ((u[:, :rank] * s[:rank]) @ vh[:rank] / scale).float()


@pytest.mark.parametrize(("init", "start_of"), [("olora", _olora_start), ("pissa", _pissa_start)])
def test_lora_export_factors_are_the_update_and_the_start(tiny_checkpoint, tmp_path, capsys, init, start_of):
    """B'A' = B_T A_T - B_0 A_0, with B_0 A_0 the init's start computed independently."""
    from safetensors.torch import load_file

    _trained_adapter(tiny_checkpoint, tmp_path / "adapter", init=init)
    _export(tiny_checkpoint, tmp_path / "adapter", "lora", tmp_path / "lora", capsys)
    trained = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    exported = load_file(tmp_path / "lora" / "adapter_model.safetensors")
    assert set(exported) == set(trained)
    key = "base_model.model.model.layers.1.mlp.down_proj.lora_{}.weight"
    a_t, b_t = trained[key.format("A")], trained[key.format("B")]
    a_x, b_x = exported[key.format("A")], exported[key.format("B")]
    assert a_x.shape == (8, a_t.shape[1]) and b_x.shape == (b_t.shape[0], 8)
    weight = _base(tiny_checkpoint).model.layers[1].mlp.down_proj.weight.detach()
    start = start_of(weight, 4, 8 / 4)  # rank 4, alpha 8
    torch.testing.assert_close(b_x @ a_x, b_t @ a_t - start, rtol=0, atol=1e-5)


@pytest.mark.parametrize("init", ["olora", "pissa"])
def test_merged_export_is_a_plain_checkpoint_of_the_finetuned_model(tiny_checkpoint, tmp_path, batch, capsys, init):
    finetuned = _trained_adapter(tiny_checkpoint, tmp_path / "adapter", init=init)
    expected = _logits(finetuned, batch)
    _export(tiny_checkpoint, tmp_path / "adapter", "merged", tmp_path / "merged", capsys)

    merged = _base(tmp_path / "merged")
    assert not any("lora" in name for name in merged.state_dict())
    torch.testing.assert_close(_logits(merged, batch), expected, rtol=0, atol=TOL)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    original_tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    text = make_records(1)[0]["instruction"]
    assert tokenizer(text)["input_ids"] == original_tokenizer(text)["input_ids"]
    assert not list(tmp_path.glob(".merged.partial*")), "the staging folder is gone"


def test_a_pissa_plus_run_exports_to_lora_and_merged(tiny_checkpoint, records_file, tmp_path, batch, capsys):
    """End to end: ``train --method pissa-plus``, then both exports reproduce what plain PEFT loads
    from the run's adapter on the original base (PEFT re-running the PiSSA init there)."""
    run = tmp_path / "run"
    code = main(["train", "--model", str(tiny_checkpoint), "--data", str(records_file), "--output", str(run),
                 "--method", "pissa-plus", "--ratio", "4", "--rank", "4", "--lr", "5e-3", "--n-train", "8",
                 "--n-eval", "2", "--batch-size", "2", "--max-steps", "3", "--max-new-tokens", "2",
                 "--metrics-mode", "teacher-forced", "--precision", "fp32", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    results = json.loads((run / "results.json").read_text())
    groups = results["training"]["optimizer_groups_per_rank"][0]
    assert groups["lora_B"]["lr"] == pytest.approx(4 * groups["lora_A"]["lr"])
    adapter = run / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["init_lora_weights"] == "pissa"
    expected = _logits(PeftModel.from_pretrained(_base(tiny_checkpoint), str(adapter)), batch)
    assert (expected - _logits(_base(tiny_checkpoint), batch)).abs().max() > 1e-3  # training moved it

    _export(tiny_checkpoint, adapter, "lora", tmp_path / "lora", capsys)
    exported = PeftModel.from_pretrained(_base(tiny_checkpoint), str(tmp_path / "lora"))
    torch.testing.assert_close(_logits(exported, batch), expected, rtol=0, atol=TOL)
    _export(tiny_checkpoint, adapter, "merged", tmp_path / "merged", capsys)
    torch.testing.assert_close(_logits(_base(tmp_path / "merged"), batch), expected, rtol=0, atol=TOL)


def test_standard_lora_adapter_export_is_a_copy(tiny_checkpoint, tmp_path, batch, capsys):
    finetuned = _trained_adapter(tiny_checkpoint, tmp_path / "adapter", init="lora")
    expected = _logits(finetuned, batch)
    _export(tiny_checkpoint, tmp_path / "adapter", "lora", tmp_path / "lora", capsys)
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "lora" / name).read_bytes() == (tmp_path / "adapter" / name).read_bytes()
    _export(tiny_checkpoint, tmp_path / "adapter", "merged", tmp_path / "merged", capsys)
    torch.testing.assert_close(_logits(_base(tmp_path / "merged"), batch), expected, rtol=0, atol=TOL)
