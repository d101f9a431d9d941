"""``OLoRAPlusSFTTrainer``: TRL's SFTTrainer with the OLoRA init and the LoRA+ groups (optional extra)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("trl")

from conftest import make_records, tiny_model  # noqa: E402
from datasets import Dataset  # noqa: E402
from trl import SFTConfig  # noqa: E402

from oloraplus.data.records import format_prompt  # noqa: E402
from oloraplus.errors import UserError  # noqa: E402
from oloraplus.method.adapters import OLoRAPlusConfig  # noqa: E402
from oloraplus.method.optim import optimizer_groups  # noqa: E402
from oloraplus.method.trl import OLoRAPlusSFTTrainer  # noqa: E402


def _trainer(tmp_path, tokenizer, **kwargs):
    model = tiny_model("llama")
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    records = make_records(8)
    dataset = Dataset.from_list([{"prompt": format_prompt(r), "completion": " " + r["output"]} for r in records])
    args = SFTConfig(output_dir=str(tmp_path / "sft"), learning_rate=5e-3, max_steps=12, per_device_train_batch_size=4,
                     logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, max_length=64, seed=0,
                     disable_tqdm=True, dataloader_num_workers=0)
    return OLoRAPlusSFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, **kwargs)


def test_sft_trainer_trains_olora_with_lora_plus_groups(tmp_path, tiny_tokenizer):
    trainer = _trainer(tmp_path, tiny_tokenizer, olora=OLoRAPlusConfig(rank=4, alpha=8), ratio=4)
    assert trainer.model.peft_config["default"].init_lora_weights == "olora"
    trainer.train()
    groups = optimizer_groups(trainer.optimizer)
    assert groups["lora_A"]["lr"] == pytest.approx(5e-3)
    assert groups["lora_B"]["lr"] == pytest.approx(4 * 5e-3)
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    assert len(losses) == 12 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3


def test_olora_with_peft_config_is_refused(tmp_path, tiny_tokenizer):
    from peft import LoraConfig

    with pytest.raises(UserError, match="either olora= or peft_config="):
        _trainer(tmp_path, tiny_tokenizer, olora=OLoRAPlusConfig(rank=4), peft_config=LoraConfig(r=4))


def test_a_ratio_given_twice_differently_is_refused(tmp_path, tiny_tokenizer):
    with pytest.raises(UserError, match=r"OLoRAPlusSFTTrainer\(ratio=2"):
        _trainer(tmp_path, tiny_tokenizer, olora=OLoRAPlusConfig(rank=4, alpha=8, ratio=4), ratio=2)


def test_without_trl_the_trainer_says_how_to_install_it(monkeypatch):
    import sys

    import oloraplus.method.trl as module

    monkeypatch.setitem(sys.modules, "trl", None)  # import trl now fails
    monkeypatch.delattr(module, "OLoRAPlusSFTTrainer", raising=False)  # the class built on first use
    with pytest.raises(UserError, match=r"pip install 'oloraplus\[trl\]'"):
        module.OLoRAPlusSFTTrainer  # noqa: B018
