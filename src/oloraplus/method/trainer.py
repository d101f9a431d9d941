"""``OLoRAPlusTrainer``: the Hugging Face Trainer with LoRA+ learning-rate groups.

The optimiser is built inside ``Trainer.create_optimizer`` (not passed in ready-made), so the
Trainer can wrap the model first for DDP, FSDP or DeepSpeed and the groups still hold the
parameters it actually trains.

Two lines in your own Trainer/TRL code::

    model = apply_olora(model, OLoRAPlusConfig(rank=32, alpha=16))
    trainer = OLoRAPlusTrainer(model=model, args=args, ratio=16, train_dataset=ds)

The ratio may be given in the constructor, in :class:`OLoRAPlusTrainingArguments` or in the
model's :class:`~oloraplus.method.adapters.OLoRAPlusConfig`; wherever it is given it reaches the
optimiser, and two places that give different values are an error, never a silent choice.
"""

from __future__ import annotations

import math
import os
import signal
from dataclasses import dataclass, field

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from oloraplus.errors import UserError, check_positive
from oloraplus.method.adapters import adapter_settings
from oloraplus.method.loss import response_loss
from oloraplus.method.optim import create_optimizer


class LoRAPlusOptimizerMixin:
    """The LoRA+ optimiser for any ``transformers.Trainer`` subclass: put it first in the bases
    (``class T(LoRAPlusOptimizerMixin, SomeTrainer)``) and the optimiser that ``create_optimizer``
    builds gives ``lora_B`` the learning rate ``ratio * args.learning_rate``.

    The constructor takes ``ratio=`` (keyword) and passes everything else on; the ratio is then
    resolved as :class:`OLoRAPlusTrainer` describes. :class:`OLoRAPlusTrainer` and
    ``oloraplus.method.trl.OLoRAPlusSFTTrainer`` (TRL's ``SFTTrainer``) are built from it.
    """

    # How error messages name the constructor that was given ``ratio=``.
    ratio_source = "OLoRAPlusTrainer"

    def __init__(self, *args, ratio: float | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.ratio = _resolve_settings(self.model, self.args, ratio, self.ratio_source)

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            self.optimizer = create_optimizer(
                self.model if model is None else model,
                lr=self.args.learning_rate,
                ratio=self.ratio,
                weight_decay=self.args.weight_decay,
                betas=(self.args.adam_beta1, self.args.adam_beta2),
                eps=self.args.adam_epsilon,
            )
            names = {group.get("name") for group in self.optimizer.param_groups}
            if self.ratio != 1.0 and "lora_B" not in names:
                # The groups are found by parameter name; FSDP1 with use_orig_params=False hides
                # the names in flat parameters, and lr_B = ratio * lr_A would silently be lost.
                raise UserError(
                    f"no trainable lora_B parameters found by name, so ratio {self.ratio} cannot be applied "
                    "(FSDP: set fsdp_config use_orig_params=true)"
                )
        return self.optimizer


class OLoRAPlusTrainer(LoRAPlusOptimizerMixin, Trainer):
    """A Trainer whose optimiser gives ``lora_B`` the learning rate ``ratio * args.learning_rate``.

    ``ratio`` may be given in three places: this constructor, ``args.ratio``
    (:class:`OLoRAPlusTrainingArguments`; ``None`` there means not given) and the
    :class:`~oloraplus.method.adapters.OLoRAPlusConfig` that ``apply_adapters`` recorded on the
    model. Every given value must agree (else :class:`UserError` naming both places); none
    given means 1. The learning rate and weight decay are ``args.learning_rate`` and
    ``args.weight_decay``. ``TrainingArguments`` cannot tell its defaults from chosen values, so
    those two always count as given: an ``lr`` or ``weight_decay`` in the model's config must
    equal them, or the constructor raises :class:`UserError`; a value set in the config is thus
    either the one the optimiser uses or an error, never silently replaced by the Trainer's
    default. The optimiser class is AdamW with the Trainer's betas and epsilon.

    With ``head_on_labels_only=True`` the LM head and the loss are computed only at positions
    that predict a label (labels != -100): the same loss, much less work when prompts are long
    or the vocabulary is large.
    """

    def __init__(self, *args, ratio: float | None = None, head_on_labels_only: bool = False, **kwargs):
        super().__init__(*args, ratio=ratio, **kwargs)
        self.head_on_labels_only = head_on_labels_only
        kill_at = os.environ.get(KILL_AT_STEP_ENV)
        if kill_at:
            self.add_callback(_KillAtStep(int(kill_at)))

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        """One forward/backward; stop at once on a NaN or infinite loss.

        The Trainer would otherwise silently replace such a loss in its log
        (``logging_nan_inf_filter``) and go on training a model it has already ruined, and
        then save it as the next checkpoint. The check runs before the optimiser step, so the
        weights and the last checkpoint are still the last good ones. It costs no extra device
        sync: the Trainer tests the same loss for NaN right after this returns.
        """
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not bool(torch.isfinite(loss).all()):
            raise NonFiniteLossError(self._non_finite_message(float(loss.detach().float().mean())))
        return loss

    def _non_finite_message(self, value: float) -> str:
        step = self.state.global_step + 1
        last = None
        if os.path.isdir(self.args.output_dir):
            last = get_last_checkpoint(self.args.output_dir)
        kept = f"the last good checkpoint is {last} (continue with --resume)" if last else "no checkpoint was saved"
        return (
            f"training loss is {value} at step {step}: training stopped; lower --lr or --ratio "
            f"(or use --precision fp32); {kept}"
        )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The model's own loss from ``labels`` (the plain Trainer path), or with
        ``head_on_labels_only`` the same loss through the speed patches of ``oloraplus.fast``
        (a boolean ``logits_to_keep`` and, where the head allows it, the fused head + loss)."""
        if not self.head_on_labels_only or return_outputs or "labels" not in inputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if num_items_in_batch is None:  # a per-batch mean; the Trainer scales it for accumulation
            return response_loss(model, inputs["input_ids"], inputs["attention_mask"], inputs["labels"], fast=True)
        # Token-weighted over the whole step, as the Trainer does for models that take loss kwargs:
        # num_items_in_batch counts the label tokens of every micro-batch on every process.
        loss = response_loss(model, inputs["input_ids"], inputs["attention_mask"], inputs["labels"], reduction="sum",
                             fast=True)
        loss = loss / num_items_in_batch
        if self.args.average_tokens_across_devices:
            loss = loss * self.accelerator.num_processes  # DDP averages gradients over processes
        return loss


def _resolve_settings(model, args, ratio: float | None, constructor: str = "OLoRAPlusTrainer") -> float:
    """The ratio every given source agrees on (1 if none gives one); check lr and weight decay.

    Raises :class:`UserError` naming both sources when two given values differ.
    """
    settings = adapter_settings(model) if model is not None else None
    given = [(source, value) for source, value in (
        (f"{constructor}(ratio={ratio})", ratio),
        (f"{type(args).__name__}(ratio={getattr(args, 'ratio', None)})", getattr(args, "ratio", None)),
        (f"the model's OLoRAPlusConfig(ratio={getattr(settings, 'ratio', None)})", getattr(settings, "ratio", None)),
    ) if value is not None]
    for _, value in given:
        check_positive("ratio", value)
    for source, value in given[1:]:
        if not math.isclose(float(value), float(given[0][1]), rel_tol=1e-9):
            raise UserError(f"ratio is given twice with different values: {given[0][0]} and {source}; "
                            "give it once, or the same value in both")
    if settings is not None:
        for field_name, arg_name in (("lr", "learning_rate"), ("weight_decay", "weight_decay")):
            value, arg_value = getattr(settings, field_name), getattr(args, arg_name)
            if value is not None and not math.isclose(float(value), float(arg_value), rel_tol=1e-9, abs_tol=0.0):
                raise UserError(
                    f"{field_name} is given twice with different values: the model's OLoRAPlusConfig("
                    f"{field_name}={value}) and {type(args).__name__}({arg_name}={arg_value}) (TrainingArguments "
                    f"always sets {arg_name}, to its default if not given); set {arg_name}={value} in the "
                    f"arguments, or leave {field_name} out of the OLoRAPlusConfig"
                )
    return float(given[0][1]) if given else 1.0


@dataclass
class OLoRAPlusTrainingArguments(TrainingArguments):
    """``TrainingArguments`` plus ``ratio`` (lambda), for scripts configured by arguments.

    ``ratio=None`` (the default) means not given: :class:`OLoRAPlusTrainer` then takes the ratio
    from its constructor or the model's config, else 1.
    """

    ratio: float | None = field(default=None, metadata={"help": "lambda = lr_B / lr_A (default: 1)"})


class NonFiniteLossError(UserError):
    """Training diverged: the loss became NaN or infinite (the message names the step)."""


# Test-only fault injection, for proving that ``--resume`` continues exactly after a crash:
# with OLORAPLUS_TEST_KILL_AT_STEP=N the process SIGKILLs itself at the end of optimiser
# step N (before that step's checkpoint, if any, is written), as an out-of-memory kill or a
# pre-empted node would. Unset (always, outside tests) it does nothing.
KILL_AT_STEP_ENV = "OLORAPLUS_TEST_KILL_AT_STEP"


class _KillAtStep(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)
