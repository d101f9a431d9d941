"""``TrainConfig``: every setting a run depends on, its validation, and what a resume may change."""

from __future__ import annotations

from dataclasses import dataclass, field

from oloraplus.data.records import DEFAULT_DATA
from oloraplus.errors import UserError, check_positive
from oloraplus.evaluation.evaluate import METRIC_MODES
from oloraplus.fast.attention import ATTENTIONS
from oloraplus.method.adapters import OLoRAPlusConfig
from oloraplus.method.registry import METHODS, get_method, plus_method
from oloraplus.models.registry import DEFAULT_MODEL
from oloraplus.training.distributed import per_device_batch_size


@dataclass
class TrainConfig:
    """Everything a run depends on; saved in ``results.json``."""

    output: str
    model: str = DEFAULT_MODEL
    data: str = DEFAULT_DATA
    method: str = "olora-plus"
    ratio: float | None = None
    rank: int = 32
    alpha: float = 16
    dropout: float = 0.0
    lr: float = 3e-4
    weight_decay: float = 0.0
    epochs: float = 1
    batch_size: int = 8
    n_train: int = 1000
    n_eval: int = 500
    data_seed: int = 42
    max_length: int = 512
    max_new_tokens: int = 128
    seed: int = 0
    max_steps: int | None = None
    metrics_mode: str = "generation"
    precision: str = "auto"
    attention: str = "auto"  # training attention kernel: auto = grouped eager for short batches on CPU, else SDPA
    compile: bool = False  # torch.compile each decoder layer for training (pays on long runs; runtime.compile_layers)
    fast: bool = True  # the speed patches of oloraplus.fast; False: the plain PEFT + Trainer path
    eval_batch_size: int = 8
    generation_batch_size: int = 64
    group_by_length: bool = True
    head_on_labels_only: bool = True
    overwrite: bool = False
    progress: bool = True
    track_dynamics: int | None = None  # every K steps append adapter metrics to dynamics.jsonl
    save_steps: int | None = None  # checkpoint every N steps into OUTPUT/checkpoints (for --resume)
    resume: bool = False  # continue from the latest checkpoint in OUTPUT
    target_modules: list[str] | None = field(default=None)

    def validate(self) -> None:
        takes_ratio = get_method(self.method).takes_ratio
        if takes_ratio and self.ratio is None:
            raise UserError(f"--method {self.method} needs --ratio (lambda = lr_B / lr_A), e.g. --ratio 0.25")
        if not takes_ratio and self.ratio not in (None, 1, 1.0):
            raise UserError(
                f"--method {self.method} trains A and B at one learning rate; use --method "
                f"{plus_method(get_method(self.method).family).name} for --ratio {self.ratio}"
            )
        for name in ("rank", "batch_size", "n_train", "n_eval", "max_length", "max_new_tokens",
                     "eval_batch_size", "generation_batch_size"):
            check_positive(name.replace("_", "-"), getattr(self, name), integer=True)
        for name in ("alpha", "lr", "epochs"):
            check_positive(name, getattr(self, name))
        if self.ratio is not None:
            check_positive("ratio", self.ratio)
        if self.max_steps is not None:
            check_positive("max-steps", self.max_steps, integer=True)
        if self.track_dynamics is not None:
            check_positive("track-dynamics", self.track_dynamics, integer=True)
        if self.save_steps is not None:
            check_positive("save-steps", self.save_steps, integer=True)
        if self.resume and self.overwrite:
            raise UserError("--resume continues the run in --output and --overwrite deletes it; pass only one")
        per_device_batch_size(self.batch_size)  # --batch-size is the global batch under torchrun
        self.adapter_config()  # dropout and weight decay, checked now rather than after loading the model
        if self.attention not in ATTENTIONS:
            raise UserError(f"unknown attention '{self.attention}': choose one of {', '.join(ATTENTIONS)}")
        if self.metrics_mode not in METRIC_MODES:
            raise UserError(f"unknown metrics mode '{self.metrics_mode}': choose {' or '.join(METRIC_MODES)}")

    @property
    def lam(self) -> float:
        return 1.0 if self.ratio is None else float(self.ratio)

    def adapter_config(self) -> OLoRAPlusConfig:
        return OLoRAPlusConfig(
            rank=self.rank,
            alpha=self.alpha,
            dropout=self.dropout,
            target_modules=self.target_modules,
            init=METHODS[self.method].init,
            lr=self.lr,
            ratio=self.lam,
            weight_decay=self.weight_decay,
        )


# Flags that change where, how fast or what is observed, not the results: a resumed run (or a
# resumed grid) may change them.
RESULT_NEUTRAL_FLAGS = frozenset({"output", "overwrite", "resume", "progress", "save_steps", "track_dynamics",
                                  "eval_batch_size", "generation_batch_size", "attention", "compile"})
