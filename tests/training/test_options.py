"""--grad-accum, --warmup-ratio, --lr-scheduler and --gradient-checkpointing."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_one_error_line, tiny_model
from transformers import TrainerCallback

from oloraplus.training.config import TrainConfig
from oloraplus.training.provenance import host
from oloraplus.training.recipe import build_trainer, train
from oloraplus.training.tracking import schedule_text


class FirstStep(TrainerCallback):
    """The LoRA gradients (after clipping) just before the first optimiser step (and the run's loss)."""

    def __init__(self):
        self.grads, self.loss, self.checkpointing = None, None, None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.grads is None:
            self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()
                          if p.requires_grad and p.grad is not None}
            self.checkpointing = any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


def _first_step(checkpoint, data, out, **settings) -> FirstStep:
    capture = FirstStep()
    config = TrainConfig(output=str(out), model=str(checkpoint), data=str(data), method="olora-plus", ratio=4.0,
                         rank=4, lr=1e-2, n_train=18, n_eval=4, n_val=2, evaluate=False, max_steps=1,
                         precision="fp32", progress=False, group_by_length=False, export=False,
                         **settings)
    capture.loss = train(config, callbacks=[capture])["training"]["train_loss"]
    assert capture.grads, "no gradients captured"
    return capture


def _assert_same_grads(a: dict, b: dict, rtol=1e-4, atol=1e-6) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=rtol, atol=atol, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("fast", [True, False])
def test_grad_accum_2_of_4_is_one_batch_of_8(tiny_checkpoint, records_file, tmp_path, fast):
    """The loss is token-weighted over the whole step (num_items_in_batch), so two micro-batches of
    4 give the gradient of one batch of the same 8 records."""
    whole = _first_step(tiny_checkpoint, records_file, tmp_path / "whole", batch_size=8, fast=fast)
    accum = _first_step(tiny_checkpoint, records_file, tmp_path / "accum", batch_size=4, grad_accum=2, fast=fast)
    _assert_same_grads(whole.grads, accum.grads)
    # ... and not trivially: a single micro-batch of 4 is a different gradient
    half = _first_step(tiny_checkpoint, records_file, tmp_path / "half", batch_size=4, fast=fast)
    assert any(not torch.allclose(whole.grads[n], half.grads[n], rtol=1e-3) for n in whole.grads)


@pytest.mark.parametrize("fast", [True, False])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tiny_checkpoint, records_file, tmp_path, fast):
    plain = _first_step(tiny_checkpoint, records_file, tmp_path / "plain", batch_size=8, fast=fast)
    recomputed = _first_step(tiny_checkpoint, records_file, tmp_path / "gc", batch_size=8, fast=fast,
                             gradient_checkpointing=True)
    assert recomputed.checkpointing and not plain.checkpointing
    assert recomputed.loss == pytest.approx(plain.loss, rel=1e-6)
    _assert_same_grads(plain.grads, recomputed.grads)


def _lr_curve(tmp_path, steps: int, **settings) -> list[tuple[float, float]]:
    """(lr_A, lr_B) that each of ``steps`` optimiser steps uses, from the optimizer's named groups."""
    from oloraplus.method.adapters import apply_olora

    config = TrainConfig(output=str(tmp_path / "out"), method="olora-plus", ratio=4.0, rank=4, lr=1e-2,
                         max_steps=steps, precision="fp32", **settings)
    config.validate()
    model = apply_olora(tiny_model("llama"), config.adapter_config())
    tokenizer = type("Tok", (), {"pad_token_id": 0})()
    trainer = build_trainer(config, model, tokenizer, [], tmp_path / "out", "fp32", "cpu")
    trainer.create_optimizer_and_scheduler(num_training_steps=steps)
    curve = []
    for _ in range(steps):
        groups = {g["name"]: g["lr"] for g in trainer.optimizer.param_groups}
        curve.append((groups["lora_A"], groups["lora_B"]))
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
    return curve


def _expected(kind: str, step: int, steps: int, warmup: int, lr: float = 1e-2) -> float:
    if step < warmup:
        return lr * step / max(1, warmup)
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * {"linear": max(0.0, 1 - progress), "cosine": 0.5 * (1 + math.cos(math.pi * progress)),
                 "constant": 1.0}[kind]


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant"])
@pytest.mark.parametrize("warmup_ratio", [0.0, 0.25])
def test_schedules_give_the_expected_lr_at_each_step(tmp_path, kind, warmup_ratio):
    steps = 10
    warmup = math.ceil(steps * warmup_ratio)
    curve = _lr_curve(tmp_path, steps, lr_scheduler=kind, warmup_ratio=warmup_ratio)
    for step, (lr_a, lr_b) in enumerate(curve):
        assert lr_a == pytest.approx(_expected(kind, step, steps, warmup), abs=1e-12), (kind, step)
        assert lr_b == pytest.approx(4.0 * lr_a, abs=1e-12)  # lr_B stays ratio x lr_A
    if warmup:
        assert curve[0][0] == 0 and curve[warmup][0] == pytest.approx(1e-2)


def test_default_schedule_is_the_papers_linear_decay_without_warmup(tmp_path):
    default = TrainConfig(output="o")
    assert (default.grad_accum, default.warmup_ratio, default.lr_scheduler, default.gradient_checkpointing,
            default.report_to) == (1, 0.0, "linear", False, "none")
    assert _lr_curve(tmp_path, 4) == _lr_curve(tmp_path, 4, lr_scheduler="linear", warmup_ratio=0.0)
    assert schedule_text("linear", 0.0) == "linear decay, no warmup (Trainer default)"
    assert schedule_text("cosine", 0.1, 3) == "linear warmup over the first 0.1 of the steps = 3 steps, then " \
                                              "cosine decay to 0"


def test_results_describe_the_schedule_and_accumulation(tiny_checkpoint, records_file, tmp_path):
    config = TrainConfig(output=str(tmp_path / "run"), model=str(tiny_checkpoint), data=str(records_file),
                         method="olora-plus", ratio=4.0, rank=4, n_train=18, n_eval=4, n_val=2, evaluate=False,
                         max_steps=4, batch_size=2, grad_accum=2, lr_scheduler="constant", warmup_ratio=0.5,
                         precision="fp32", progress=False, export=False)
    results = train(config)
    assert results["training"]["steps"] == 4
    assert results["training"]["lr_schedule"] == ("linear warmup over the first 0.5 of the steps = 2 steps, "
                                                  "then constant")
    assert results["config"]["grad_accum"] == 2
    assert results["host"] == host()  # where it ran: the CPU (family, model, bf16 units), any GPU


@pytest.mark.parametrize("flags, needles", [
    (["--grad-accum", "0"], ("grad-accum",)),
    (["--warmup-ratio", "1.5"], ("--warmup-ratio", "[0, 1)")),
    (["--warmup-ratio", "-0.1"], ("--warmup-ratio",)),
    (["--lr-scheduler", "polynomial"], ("--lr-scheduler", "polynomial")),
    (["--gradient-checkpointing", "--compile"], ("--gradient-checkpointing", "--compile")),
])
def test_bad_options_are_one_error_line(flags, needles, records_file, tmp_path, capsys):
    argv = ["train", "--output", str(tmp_path / "o"), "--data", str(records_file), "--method", "olora", *flags]
    assert_one_error_line(argv, capsys, *needles)


def test_options_come_from_a_config_file(tmp_path):
    from oloraplus.training.config import read_settings

    path = tmp_path / "run.yaml"
    path.write_text("output: o\nmethod: olora\ngrad_accum: 4\nwarmup-ratio: 0.1\nlr_scheduler: cosine\n"
                    "gradient_checkpointing: yes\nreport_to: none\n")
    config = TrainConfig(**read_settings(path, [f for f in TrainConfig.__dataclass_fields__]))
    config.validate()
    assert (config.grad_accum, config.warmup_ratio, config.lr_scheduler, config.gradient_checkpointing) == \
        (4, 0.1, "cosine", True)
