"""``train`` writes a servable standard LoRA beside the OLoRA adapter, and a model card in both."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_records
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from oloraplus.cli import main
from oloraplus.data.batching import collate
from oloraplus.data.tokenize import tokenize_records

TOL = 1e-4


def _base(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def _train(checkpoint, records_file, run, capsys, *extra: str) -> None:
    code = main(["train", "--model", str(checkpoint), "--data", str(records_file), "--output", str(run),
                 "--method", "olora-plus", "--rank", "4", "--lr", "5e-3", "--ratio", "4", "--n-train", "8",
                 "--n-eval", "2", "--batch-size", "2", "--max-steps", "3", "--max-new-tokens", "2",
                 "--metrics-mode", "teacher-forced", "--precision", "fp32", "--no-progress", *extra])
    assert code == 0, capsys.readouterr().err


def test_train_writes_a_standard_lora_that_plain_peft_loads_on_the_untouched_base(
        tiny_checkpoint, records_file, tmp_path, capsys):
    run = tmp_path / "run"
    _train(tiny_checkpoint, records_file, run, capsys)
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    batch = collate(tokenize_records(make_records(4), tokenizer, max_length=64)[0], tokenizer.pad_token_id)

    lora_config = json.loads((run / "adapter-lora" / "adapter_config.json").read_text())
    assert lora_config["init_lora_weights"] is True and lora_config["r"] == 8
    # The trained model: PEFT re-runs the OLoRA init on a fresh base, then merging is exact.
    trained = PeftModel.from_pretrained(_base(tiny_checkpoint), str(run / "adapter")).merge_and_unload()
    expected = _logits(trained, batch)
    assert (expected - _logits(_base(tiny_checkpoint), batch)).abs().max() > 1e-3  # training moved it
    served = PeftModel.from_pretrained(_base(tiny_checkpoint), str(run / "adapter-lora"))
    torch.testing.assert_close(_logits(served, batch), expected, rtol=0, atol=TOL)

    results = json.loads((run / "results.json").read_text())
    for folder in ("adapter", "adapter-lora"):
        card = (run / folder / "README.md").read_text()
        assert card.startswith("---\nlibrary_name: peft\nbase_model: ")
        assert json.loads((run / folder / "oloraplus.json").read_text())["base_fingerprint"] in card
        assert results["data"]["sha256"] in card and "olora-plus" in card
        assert "lambda = lr_B / lr_A = 4" in card and "PeftModel.from_pretrained" in card
        assert f"| eval_loss | {results['metrics']['eval_loss']:.6g} |" in card


def test_no_export_writes_only_the_adapter(tiny_checkpoint, records_file, tmp_path, capsys):
    run = tmp_path / "run"
    _train(tiny_checkpoint, records_file, run, capsys, "--no-export")
    assert (run / "adapter" / "README.md").read_text().startswith("---\nlibrary_name: peft\n")
    assert not (run / "adapter-lora").exists()
    assert json.loads((run / "results.json").read_text())["config"]["export"] is False


@pytest.mark.parametrize("method", ["lora-plus"])
def test_a_standard_init_run_copies_its_adapter(tiny_checkpoint, records_file, tmp_path, capsys, method):
    run = tmp_path / "run"
    _train(tiny_checkpoint, records_file, run, capsys, "--method", method)
    assert (run / "adapter-lora" / "adapter_model.safetensors").read_bytes() == (
        run / "adapter" / "adapter_model.safetensors").read_bytes()
    assert "Standard LoRA adapter" in (run / "adapter-lora" / "README.md").read_text()
