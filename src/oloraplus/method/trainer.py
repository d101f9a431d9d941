"""``OLoRAPlusTrainer``: the Hugging Face Trainer with LoRA+ learning-rate groups.

The optimiser is built inside ``Trainer.create_optimizer`` (not passed in ready-made), so the
Trainer can wrap the model first for DDP, FSDP or DeepSpeed and the groups still hold the
parameters it actually trains.

Two lines in your own Trainer/TRL code::

    model = apply_olora(model, OLoRAPlusConfig(rank=32, alpha=16))
    trainer = OLoRAPlusTrainer(model=model, args=args, ratio=16, train_dataset=ds)
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass, field

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from oloraplus.errors import UserError, check_positive
from oloraplus.method.loss import response_loss
from oloraplus.method.optim import create_optimizer


class OLoRAPlusTrainer(Trainer):
    """A Trainer whose optimiser gives ``lora_B`` the learning rate ``ratio * args.learning_rate``.

    ``ratio`` comes from the constructor or, if not given there, from ``args.ratio`` (see
    :class:`OLoRAPlusTrainingArguments`), else 1. Weight decay is
    ``args.weight_decay``; the optimiser class is AdamW with the Trainer's betas and epsilon.

    With ``head_on_labels_only=True`` the LM head and the loss are computed only at positions
    that predict a label (labels != -100): the same loss, much less work when prompts are long
    or the vocabulary is large.
    """

    def __init__(self, *args, ratio: float | None = None, head_on_labels_only: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.ratio = float(ratio if ratio is not None else getattr(self.args, "ratio", 1.0))
        check_positive("ratio", self.ratio)
        self.head_on_labels_only = head_on_labels_only
        kill_at = os.environ.get(KILL_AT_STEP_ENV)
        if kill_at:
            self.add_callback(_KillAtStep(int(kill_at)))

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
        if not self.head_on_labels_only or return_outputs or "labels" not in inputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if num_items_in_batch is None:  # a per-batch mean; the Trainer scales it for accumulation
            return response_loss(model, inputs["input_ids"], inputs["attention_mask"], inputs["labels"])
        # Token-weighted over the whole step, as the Trainer does for models that take loss kwargs:
        # num_items_in_batch counts the label tokens of every micro-batch on every process.
        loss = response_loss(model, inputs["input_ids"], inputs["attention_mask"], inputs["labels"], reduction="sum")
        loss = loss / num_items_in_batch
        if self.args.average_tokens_across_devices:
            loss = loss * self.accelerator.num_processes  # DDP averages gradients over processes
        return loss


@dataclass
class OLoRAPlusTrainingArguments(TrainingArguments):
    """``TrainingArguments`` plus ``ratio`` (lambda), for scripts configured by arguments."""

    ratio: float = field(default=1.0, metadata={"help": "lambda = lr_B / lr_A"})


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
