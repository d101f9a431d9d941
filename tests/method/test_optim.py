"""LoRA+ parameter groups: lr_B = ratio * lr, everything else at lr, each parameter once.

The checks walk the model's own ``named_parameters`` and look each parameter up in the
optimiser by identity, so they hold whatever the grouping code does internally.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_records, tiny_model
from transformers import TrainerCallback, TrainingArguments

from oloraplus.data.batching import Collator, ExampleDataset
from oloraplus.data.tokenize import tokenize_records
from oloraplus.errors import UserError
from oloraplus.method.adapters import OLoRAPlusConfig, apply_olora
from oloraplus.method.optim import create_optimizer
from oloraplus.method.trainer import OLoRAPlusTrainer, OLoRAPlusTrainingArguments

LR = 1e-3
WD = 0.05


def peft_model_with_extras():
    """LoRA adapters + a modules_to_save copy of lm_head (2-D) + trainable norms (1-D)."""
    model = apply_olora(tiny_model("llama"), OLoRAPlusConfig(rank=4, modules_to_save=["lm_head"]))
    for name, param in model.named_parameters():
        if name.endswith("model.norm.weight") or name.endswith("layers.0.input_layernorm.weight"):
            param.requires_grad_(True)
    return model


def peft_opt_with_bias():
    """OPT has biased Linears: make the q_proj biases trainable next to the adapters."""
    model = apply_olora(tiny_model("opt"), OLoRAPlusConfig(rank=4))
    for name, param in model.named_parameters():
        if name.endswith("q_proj.base_layer.bias"):
            param.requires_grad_(True)
    return model


def group_of(optimizer: torch.optim.Optimizer) -> dict[int, list[dict]]:
    """id(param) -> every group that holds it."""
    found: dict[int, list[dict]] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            found.setdefault(id(p), []).append(group)
    return found


def check_groups(model, optimizer, lr: float, ratio: float, weight_decay: float) -> None:
    found = group_of(optimizer)
    assert all(group["params"] for group in optimizer.param_groups), "empty group"
    kinds = set()
    for name, param in model.named_parameters():
        groups = found.get(id(param), [])
        if not param.requires_grad:
            assert groups == [], f"frozen {name} is in the optimiser"
            continue
        assert len(groups) == 1, f"{name} is in {len(groups)} groups"
        group = groups[0]
        if "lora_B" in name:
            kinds.add("B")
            assert group["lr"] == pytest.approx(ratio * lr, rel=1e-12), name
            assert group["weight_decay"] == weight_decay, name
        else:
            assert group["lr"] == pytest.approx(lr, rel=1e-12), name
            if param.ndim < 2:
                kinds.add("1-D")
                assert group["weight_decay"] == 0.0, f"{name} (1-D) gets weight decay"
            else:
                kinds.add("A" if "lora_A" in name else "other 2-D")
                assert group["weight_decay"] == weight_decay, name
    n_trainable = sum(1 for p in model.parameters() if p.requires_grad)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == n_trainable
    return kinds


@pytest.mark.parametrize("ratio", [1 / 16, 1.0, 16.0])
def test_groups_for_each_ratio(ratio):
    model = peft_model_with_extras()
    optimizer = create_optimizer(model, lr=LR, ratio=ratio, weight_decay=WD)
    assert isinstance(optimizer, torch.optim.AdamW)
    kinds = check_groups(model, optimizer, LR, ratio, WD)
    assert kinds == {"A", "B", "1-D", "other 2-D"}  # the fixture really has every kind


def test_trainable_bias_gets_lr_and_no_decay():
    model = peft_opt_with_bias()
    optimizer = create_optimizer(model, lr=LR, ratio=4.0, weight_decay=WD)
    assert check_groups(model, optimizer, LR, 4.0, WD) == {"A", "B", "1-D"}


def test_no_empty_groups_with_adapters_only():
    model = apply_olora(tiny_model("llama"), OLoRAPlusConfig(rank=4))
    optimizer = create_optimizer(model, lr=LR, ratio=2.0)
    assert len(optimizer.param_groups) == 2
    check_groups(model, optimizer, LR, 2.0, 0.0)


@pytest.mark.parametrize("ratio", [0, -1.0, float("nan"), float("inf")])
def test_bad_ratio_rejected(ratio):
    model = apply_olora(tiny_model("llama"), OLoRAPlusConfig(rank=4))
    with pytest.raises(UserError, match="ratio"):
        create_optimizer(model, lr=LR, ratio=ratio)


def test_bad_lr_and_weight_decay_rejected():
    model = apply_olora(tiny_model("llama"), OLoRAPlusConfig(rank=4))
    with pytest.raises(UserError, match="lr"):
        create_optimizer(model, lr=0.0, ratio=1.0)
    with pytest.raises(UserError, match="weight_decay"):
        create_optimizer(model, lr=LR, ratio=1.0, weight_decay=float("nan"))


def test_no_trainable_parameters_rejected():
    model = tiny_model("llama")
    model.requires_grad_(False)
    with pytest.raises(UserError, match="trainable"):
        create_optimizer(model, lr=LR, ratio=1.0)


# --- OLoRAPlusTrainer ---------------------------------------------------------------------


@pytest.fixture
def train_dataset(tiny_tokenizer):
    examples, _ = tokenize_records(make_records(8), tiny_tokenizer, max_length=128)
    return ExampleDataset(examples)


def trainer_for(model, args, dataset, tokenizer, **kwargs) -> OLoRAPlusTrainer:
    return OLoRAPlusTrainer(model=model, args=args, train_dataset=dataset,
                            data_collator=Collator(tokenizer.pad_token_id), **kwargs)


def base_args(tmp_path, cls=TrainingArguments, **kwargs):
    return cls(output_dir=str(tmp_path), use_cpu=True, report_to=[], learning_rate=LR, weight_decay=WD,
               remove_unused_columns=False, save_strategy="no", disable_tqdm=True, **kwargs)


@pytest.mark.parametrize("ratio", [1 / 16, 1.0, 16.0])
def test_trainer_ratio_from_constructor(tmp_path, train_dataset, tiny_tokenizer, ratio):
    model = peft_model_with_extras()
    trainer = trainer_for(model, base_args(tmp_path), train_dataset, tiny_tokenizer, ratio=ratio)
    optimizer = trainer.create_optimizer()
    check_groups(model, optimizer, LR, ratio, WD)
    args = trainer.args
    assert optimizer.defaults["betas"] == (args.adam_beta1, args.adam_beta2)
    assert optimizer.defaults["eps"] == args.adam_epsilon


# Where a ratio can be given: the Trainer's constructor, OLoRAPlusTrainingArguments, and the
# OLoRAPlusConfig that apply_olora records on the model.
SOURCES = ("constructor", "arguments", "config")
SOURCE_NAMES = {"constructor": "OLoRAPlusTrainer(ratio=", "arguments": "OLoRAPlusTrainingArguments(ratio=",
                "config": "OLoRAPlusConfig(ratio="}


def trainer_with_ratios(tmp_path, dataset, tokenizer, ratios: dict[str, float], **config):
    """A Trainer (and its model) with ``ratios[source]`` given at each named source only."""
    model = apply_olora(tiny_model("llama"), OLoRAPlusConfig(rank=4, ratio=ratios.get("config"), **config))
    args = base_args(tmp_path, OLoRAPlusTrainingArguments, ratio=ratios.get("arguments"))
    kwargs = {"ratio": ratios["constructor"]} if "constructor" in ratios else {}
    return trainer_for(model, args, dataset, tokenizer, **kwargs), model


@pytest.mark.parametrize("source", SOURCES)
def test_trainer_ratio_given_one_way_reaches_the_groups(tmp_path, train_dataset, tiny_tokenizer, source):
    trainer, model = trainer_with_ratios(tmp_path, train_dataset, tiny_tokenizer, {source: 8.0})
    assert trainer.ratio == 8.0
    check_groups(model, trainer.create_optimizer(), LR, 8.0, WD)


def test_trainer_ratio_given_nowhere_is_one(tmp_path, train_dataset, tiny_tokenizer):
    trainer, model = trainer_with_ratios(tmp_path, train_dataset, tiny_tokenizer, {})
    assert OLoRAPlusTrainingArguments(output_dir=str(tmp_path)).ratio is None  # "not given"
    check_groups(model, trainer.create_optimizer(), LR, 1.0, WD)


@pytest.mark.parametrize("sources", [("constructor", "arguments"), ("constructor", "config"),
                                     ("arguments", "config"), SOURCES])
def test_trainer_ratio_given_twice_alike_is_used(tmp_path, train_dataset, tiny_tokenizer, sources):
    trainer, model = trainer_with_ratios(tmp_path, train_dataset, tiny_tokenizer, dict.fromkeys(sources, 0.25))
    check_groups(model, trainer.create_optimizer(), LR, 0.25, WD)


@pytest.mark.parametrize("pair", [("constructor", "arguments"), ("constructor", "config"), ("arguments", "config")])
def test_trainer_ratio_given_twice_differently_names_both(tmp_path, train_dataset, tiny_tokenizer, pair):
    ratios = {pair[0]: 0.25, pair[1]: 16.0}
    with pytest.raises(UserError) as info:
        trainer_with_ratios(tmp_path, train_dataset, tiny_tokenizer, ratios)
    message = str(info.value)
    for source in pair:
        assert f"{SOURCE_NAMES[source]}{ratios[source]})" in message, message


def test_config_lr_and_weight_decay_must_match_the_arguments(tmp_path, train_dataset, tiny_tokenizer):
    """TrainingArguments always has a learning rate and weight decay, so a config value is checked
    against them: equal, it is the value the groups get; different, the Trainer refuses to start."""
    trainer, model = trainer_with_ratios(tmp_path, train_dataset, tiny_tokenizer, {"config": 4.0},
                                         lr=LR, weight_decay=WD)
    check_groups(model, trainer.create_optimizer(), LR, 4.0, WD)
    for field, arg, value in (("lr", "learning_rate", 2 * LR), ("weight_decay", "weight_decay", 2 * WD)):
        with pytest.raises(UserError) as info:
            trainer_with_ratios(tmp_path, train_dataset, tiny_tokenizer, {}, **{field: value})
        message = str(info.value)
        assert f"OLoRAPlusConfig({field}={value})" in message and f"({arg}=" in message, message
    # Left at TrainingArguments' default learning rate, the config's lr is still not silently replaced.
    model = apply_olora(tiny_model("llama"), OLoRAPlusConfig(rank=4, lr=LR))
    default_args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    with pytest.raises(UserError, match="learning_rate"):
        trainer_for(model, default_args, train_dataset, tiny_tokenizer)


def test_trainer_rejects_bad_ratio(tmp_path, train_dataset, tiny_tokenizer):
    model = apply_olora(tiny_model("llama"), OLoRAPlusConfig(rank=4))
    with pytest.raises(UserError):
        trainer_for(model, base_args(tmp_path), train_dataset, tiny_tokenizer, ratio=0)


class _RecordLRs(TrainerCallback):
    def __init__(self):
        self.rows: list[dict[str, float]] = []

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        self.rows.append({g["name"]: g["lr"] for g in optimizer.param_groups})


@pytest.mark.parametrize("head_on_labels_only", [False, True])
def test_ratio_holds_across_scheduler_steps(tmp_path, train_dataset, tiny_tokenizer, head_on_labels_only):
    ratio = 4.0
    model = apply_olora(tiny_model("llama"), OLoRAPlusConfig(rank=4))
    b_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    record = _RecordLRs()
    args = base_args(tmp_path, max_steps=4, per_device_train_batch_size=2, lr_scheduler_type="linear",
                     warmup_steps=1, logging_steps=1)
    trainer = trainer_for(model, args, train_dataset, tiny_tokenizer, ratio=ratio,
                          head_on_labels_only=head_on_labels_only, callbacks=[record])
    output = trainer.train()
    assert trainer.state.global_step == 4
    assert math.isfinite(output.training_loss)
    assert len(record.rows) == 4
    lrs_a = [row["lora_A"] for row in record.rows]
    assert len(set(lrs_a)) > 1, "the scheduler never changed the learning rate"
    for row in record.rows:
        if row["lora_A"] > 0:
            assert row["lora_B"] / row["lora_A"] == pytest.approx(ratio, rel=1e-9)
        else:
            assert row["lora_B"] == 0
    moved = [n for n, p in model.named_parameters() if "lora_B" in n and not torch.equal(p, b_before[n])]
    assert moved, "training did not update B"
