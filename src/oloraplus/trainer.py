"""``OLoRAPlusTrainer``: the Hugging Face Trainer with LoRA+ learning-rate groups.

The optimiser is built inside ``Trainer.create_optimizer`` (not passed in ready-made), so the
Trainer can wrap the model first for DDP, FSDP or DeepSpeed and the groups still hold the
parameters it actually trains.

Two lines in your own Trainer/TRL code::

    model = apply_olora(model, OLoRAPlusConfig(rank=32, alpha=16))
    trainer = OLoRAPlusTrainer(model=model, args=args, ratio=16, train_dataset=ds)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import Trainer, TrainingArguments

from .errors import check_positive
from .evaluation import response_loss
from .optim import create_optimizer


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
        if head_on_labels_only:
            self.loss_is_scaled_for_ga = False  # compute_loss returns a per-batch mean

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
        return self.optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self.head_on_labels_only or return_outputs or "labels" not in inputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        return response_loss(model, inputs["input_ids"], inputs["attention_mask"], inputs["labels"])


@dataclass
class OLoRAPlusTrainingArguments(TrainingArguments):
    """``TrainingArguments`` plus ``ratio`` (lambda), for scripts configured by arguments."""

    ratio: float = field(default=1.0, metadata={"help": "lambda = lr_B / lr_A"})
