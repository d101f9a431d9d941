"""``TrainConfig``: every setting a run depends on, its validation, config files, and what a resume may
change."""

from __future__ import annotations

import json
import types
import typing
from argparse import ArgumentTypeError
from collections.abc import Collection
from dataclasses import MISSING, asdict, dataclass, field, fields
from fractions import Fraction
from pathlib import Path
from typing import Any

import yaml

from oloraplus.analysis.drift import REFERENCES
from oloraplus.data.formats import FORMAT_CHOICES, template_slots
from oloraplus.data.records import DEFAULT_DATA
from oloraplus.data.split import check_n_val
from oloraplus.errors import UserError, check_positive
from oloraplus.evaluation.evaluate import METRIC_MODES
from oloraplus.fast.attention import ATTENTIONS, CPU_EAGER_MAX_LENGTH
from oloraplus.method.adapters import OLoRAPlusConfig
from oloraplus.method.registry import METHODS, get_method, plus_method
from oloraplus.models.registry import DEFAULT_MODEL
from oloraplus.training.distributed import per_device_batch_size
from oloraplus.training.runtime import PRECISIONS
from oloraplus.training.tracking import LR_SCHEDULERS, REPORT_TO, check_backend


class Ratio(float):
    """A ``--ratio`` value: a number or a fraction such as ``"1/16"``.

    ``HfArgumentParser`` types a flag by its field's annotation, so the ``ratio`` field is
    annotated with this float subclass; :class:`TrainConfig` stores a plain ``float``.
    """

    def __new__(cls, value: str | float) -> Ratio:
        try:
            text = str(value).strip()
            return super().__new__(cls, Fraction(text) if "/" in text else text)
        except (ValueError, ZeroDivisionError):
            # argparse prints "argument --ratio: " followed by this text
            raise ArgumentTypeError(f"invalid float value: {value!r}") from None


def _setting(default: Any = MISSING, help: str = "", **argparse_kwargs: Any) -> Any:
    """A :class:`TrainConfig` field: its default, and the help (plus ``choices``, ``metavar`` or
    ``required``) of the command-line flag ``HfArgumentParser`` derives from it."""
    return field(default=default, metadata={"help": help, **argparse_kwargs})


@dataclass
class TrainConfig:
    """Everything a run depends on; saved in ``results.json``.

    The one definition of a run's settings: the flags of ``oloraplus train`` (and the subsets of
    ``evaluate``, ``reproduce`` and ``sweep``), the keys of a ``--config`` file and
    ``results.json["config"]`` all derive from these fields, and :meth:`validate` checks them
    whichever way they came. A new setting is one field here (with its ``help``).
    """

    output: str = _setting(help="run folder to write")
    model: str = _setting(DEFAULT_MODEL, "registry name, hub id, checkpoint folder or .gguf file")
    data: str = _setting(DEFAULT_DATA, ".json/.jsonl/.csv/.parquet file or hub dataset id (e.g. tatsu-lab/alpaca); "
                         "default: $OLORAPLUS_DATA, else the local Alpaca file, else the hub's tatsu-lab/alpaca")
    format: str = _setting("auto", "data format: alpaca (instruction/input/output), prompt-completion (--prompt-field, "
                           "--response-field, --template) or chat (a messages list, the tokenizer's chat template); "
                           "auto: detected from the records", choices=FORMAT_CHOICES)
    prompt_field: str | None = _setting(None, "prompt-completion: the prompt column (default: prompt)",
                                        metavar="COLUMN")
    response_field: str | None = _setting(None, "prompt-completion: the response column (default: completion)",
                                          metavar="COLUMN")
    template: str | None = _setting(None, "prompt-completion: the prompt built from columns, e.g. "
                                    "'Q: {question}\\nA: ' (instead of --prompt-field)", metavar="TEXT")
    split: str = _setting("train", "the split of a hub dataset --data")
    # choices: a live view of the registry, so methods registered later are accepted too
    method: str = _setting("olora-plus", "adapter init and optimiser rule; the -plus methods train B at "
                           "--ratio times the learning rate of A", choices=METHODS.keys(), required=True)
    ratio: Ratio | None = _setting(None, "lambda = lr_B / lr_A (the -plus methods), e.g. 16, 0.0625 or 1/16",
                                   metavar="LAMBDA")
    rank: int = _setting(32, "adapter rank r")
    alpha: float = _setting(16, "LoRA scaling: the update is (alpha / rank) * B A")
    dropout: float = _setting(0.0, "dropout on the adapter's input, in [0, 1)")
    lr: float = _setting(3e-4, "learning rate lr_A; lr_B = ratio * lr_A")
    weight_decay: float = _setting(0.0, "AdamW weight decay")
    epochs: float = _setting(1, "passes over the training records (fractions allowed)")
    batch_size: int = _setting(8, "global batch size of each forward/backward pass (split evenly across the "
                               "processes under torchrun); an optimiser step sees --batch-size x --grad-accum "
                               "records")
    n_train: int = _setting(1000, "training records drawn from --data")
    n_eval: int = _setting(500, "evaluation records, disjoint from the training ones")
    data_seed: int = _setting(42, "seed of the train/eval split (the same seed gives the same records)")
    n_val: int = _setting(0, "validation records carved from the --n-train ones (the last N of them; training "
                          "uses the other n_train - N); their loss is metrics.val_loss in results.json",
                          metavar="N")
    eval_steps: int | None = _setting(None, "every K steps compute the loss on the --n-val validation records "
                                      "(results.json training.val_log)", metavar="K")
    evaluate: bool = _setting(True, "evaluate on the eval records after training; --no-evaluate: skip it (no "
                              "eval metrics or predictions: for tuning on the validation loss)")
    max_length: int = _setting(512, "longest tokenized example; longer ones are cut")
    max_new_tokens: int = _setting(128, "most tokens generated per evaluation prompt")
    seed: int = _setting(0, "training seed (adapter init of plain LoRA, dropout, batch order)")
    max_steps: int | None = _setting(None, "stop after N optimiser steps (default: run --epochs)", metavar="N")
    metrics_mode: str = _setting("generation", "BLEU/ROUGE from greedy generation, or from argmax next-token "
                                 "predictions on the reference", choices=METRIC_MODES)
    precision: str = _setting("auto", "auto: bf16 autocast where the hardware has native bf16, else fp32",
                              choices=PRECISIONS)
    attention: str = _setting("auto", f"training attention kernel; auto: grouped (our eager kernel) for batches "
                              f"up to {CPU_EAGER_MAX_LENGTH} tokens on CPU, else SDPA; eager: transformers' own",
                              choices=ATTENTIONS)
    compile: bool = _setting(False, "torch.compile each decoder layer for training: a one-time compilation "
                             "before the first step, then faster steps; for long runs")
    fast: bool = _setting(True, "the speed patches of oloraplus.fast; --no-fast: the plain PEFT + Trainer path")
    eval_batch_size: int = _setting(8, "batch size of the evaluation loss")
    generation_batch_size: int = _setting(64, "prompts generated at once in evaluation")
    group_by_length: bool = _setting(True, "batch records of similar length (faster; each batch is then "
                                     "less mixed, see docs/speed.md); --no-group-by-length: random batches")
    head_on_labels_only: bool = _setting(True, "compute the LM head and the loss only where there are labels "
                                         "(the response tokens)")
    overwrite: bool = _setting(False, "replace a non-empty --output")
    progress: bool = _setting(True, "progress bars on stderr")
    track_dynamics: int | None = _setting(None, "every K steps append adapter drift metrics to "
                                          "OUTPUT/dynamics.jsonl", metavar="K")
    save_steps: int | None = _setting(None, "checkpoint every N steps into OUTPUT/checkpoints (needed for "
                                      "--resume)", metavar="N")
    resume: bool = _setting(False, "continue an interrupted run from the latest checkpoint in --output "
                            "(same settings)")
    target_modules: list[str] | None = _setting(None, "module names to adapt (default: every attention and "
                                                "MLP Linear)", metavar="NAME")
    resume_weights_only: bool = _setting(False, "with --resume: accept a checkpoint without optimizer state "
                                         "(the optimizer and lr schedule restart: not an exact resume)")
    export: bool = _setting(True, "also write OUTPUT/adapter-lora, the adapter as a standard LoRA for the "
                            "untouched base model; --no-export: only OUTPUT/adapter")
    grad_accum: int = _setting(1, "gradient accumulation: each optimiser step sums the gradients of N batches of "
                               "--batch-size records (the loss is weighted by response tokens over all N), so a "
                               "step sees --batch-size x N records", metavar="N")
    warmup_ratio: float = _setting(0.0, "linear learning-rate warmup over this fraction of the optimiser steps, "
                                   "in [0, 1) (0: no warmup)", metavar="R")
    lr_scheduler: str = _setting("linear", "learning-rate schedule after the warmup: linear or cosine decay to 0, "
                                 "or constant; lr_B stays ratio x lr_A throughout", choices=LR_SCHEDULERS)
    gradient_checkpointing: bool = _setting(False, "recompute each decoder layer's activations in the backward "
                                            "pass (less memory, more compute; same loss and gradients); on CPU the "
                                            "freed fp32 copies of the frozen weights are handed back before training")
    report_to: str = _setting("none", "log train loss, lr_A, lr_B, validation loss and adapter drift to "
                              "TensorBoard (OUTPUT/logs), MLflow or Weights & Biases; each needs its extra, "
                              "e.g. pip install 'oloraplus[tensorboard]'", choices=REPORT_TO)

    def __post_init__(self) -> None:
        if isinstance(self.ratio, Ratio):  # as parsed from a flag: store the plain float
            self.ratio = float(self.ratio)

    def validate(self, names: Collection[str] | None = None) -> None:
        """Raise :class:`UserError` naming the first bad setting; nothing is loaded.

        Called before every run however the config was made (flags, a ``--config`` file, a grid,
        library code). ``names`` limits the checks to those fields (``evaluate`` uses a subset).
        """
        names = {f.name for f in fields(self)} if names is None else set(names)
        for name in sorted(names):
            _check_type(name, getattr(self, name), _FIELD_TYPES[name])
        if "method" in names:
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
            if name in names:
                check_positive(name.replace("_", "-"), getattr(self, name), integer=True)
        for name in ("alpha", "lr", "epochs", "ratio"):
            if name in names and getattr(self, name) is not None:
                check_positive(name, getattr(self, name))
        for name in ("max_steps", "track_dynamics", "save_steps", "eval_steps"):
            if name in names and getattr(self, name) is not None:
                check_positive(name.replace("_", "-"), getattr(self, name), integer=True)
        if {"n_val", "n_train"} <= names:
            check_n_val(self.n_val, self.n_train)
        if self.eval_steps is not None and {"eval_steps", "n_val"} <= names and not self.n_val:
            raise UserError("--eval-steps computes the validation loss: give --n-val N validation records too")
        if not self.evaluate and {"evaluate", "n_val"} <= names and not self.n_val:
            raise UserError("--no-evaluate leaves a run without any metric: give --n-val N validation records")
        if self.track_dynamics is not None and {"track_dynamics", "method"} <= names:
            init = get_method(self.method).init
            if init not in REFERENCES:  # refused before the model loads, not at the first step
                raise UserError(f"--track-dynamics supports {', '.join(REFERENCES)} adapters, not {init} "
                                f"(--method {self.method})")
        if {"fast", "compile", "attention"} <= names and not self.fast and (self.compile or self.attention != "auto"):
            flag = "--compile" if self.compile else f"--attention {self.attention}"
            raise UserError(f"{flag} is one of the speed patches of --fast; drop {flag} or --no-fast")
        if "seed" in names and not 0 <= self.seed < 2**32:  # the range numpy's seed accepts
            raise UserError(f"--seed must be an integer from 0 to {2**32 - 1}, got {self.seed}")
        if self.resume_weights_only and not self.resume and {"resume", "resume_weights_only"} <= names:
            raise UserError("--resume-weights-only only applies together with --resume")
        if self.resume and self.overwrite and {"resume", "overwrite"} <= names:
            raise UserError("--resume continues the run in --output and --overwrite deletes it; pass only one")
        if "batch_size" in names:
            per_device_batch_size(self.batch_size)  # --batch-size is the global batch under torchrun
        if names >= {"rank", "alpha", "dropout", "weight_decay", "method"}:
            self.adapter_config()  # dropout and weight decay, checked now rather than after loading the model
        if "grad_accum" in names:
            check_positive("grad-accum", self.grad_accum, integer=True)
        if "warmup_ratio" in names and not 0 <= self.warmup_ratio < 1:
            raise UserError(f"--warmup-ratio must be in [0, 1) (a fraction of the optimiser steps), got "
                            f"{self.warmup_ratio}")
        if "report_to" in names:
            check_backend(self.report_to)  # unknown value, or its package not installed
        if {"gradient_checkpointing", "compile"} <= names and self.gradient_checkpointing and self.compile:
            raise UserError("--gradient-checkpointing does not combine with --compile; drop one of them")
        if "format" in names and self.format not in FORMAT_CHOICES:
            raise UserError(f"unknown format '{self.format}': choose one of {', '.join(FORMAT_CHOICES)}")
        for name in ("prompt_field", "response_field", "template"):
            if name in names and getattr(self, name) is not None and self.format not in ("auto", "prompt-completion"):
                raise UserError(f"--{name.replace('_', '-')} applies to --format prompt-completion, not "
                                f"--format {self.format}")
        if "template" in names and self.template is not None:
            if self.prompt_field is not None:
                raise UserError("--template builds the prompt from columns; drop --prompt-field or --template")
            template_slots(self.template)  # a malformed template fails now, not after loading the data
        for name, choices in (("attention", ATTENTIONS), ("metrics_mode", METRIC_MODES), ("precision", PRECISIONS),
                               ("lr_scheduler", LR_SCHEDULERS)):
            if name in names and getattr(self, name) not in choices:
                raise UserError(f"unknown {name.replace('_', ' ')} '{getattr(self, name)}': choose one of "
                                f"{', '.join(choices)}")

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
                                  "eval_batch_size", "generation_batch_size", "attention", "compile",
                                  "export", "gradient_checkpointing", "report_to"})

# The fields ``oloraplus evaluate`` takes (it re-evaluates a saved adapter: no training settings).
EVALUATE_FIELDS = ("output", "model", "data", "format", "prompt_field", "response_field", "template", "split",
                   "n_train", "n_eval", "data_seed", "max_length", "max_new_tokens",
                   "metrics_mode", "precision", "eval_batch_size", "generation_batch_size", "overwrite", "progress",
                   "fast")

CONFIG_SUFFIXES = (".yaml", ".yml", ".json")

_FIELD_TYPES = typing.get_type_hints(TrainConfig)


def _check_type(name: str, value: Any, hint: Any) -> None:
    """A :class:`UserError` unless ``value`` has the field's type (``X | None``, bool, int, float, str, list[str])."""
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        if value is None and type(None) in args:
            return
        hint = next(a for a in args if a is not type(None))
    if hint is Ratio:
        hint = float
    if typing.get_origin(hint) is list:
        ok, wanted = isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value), "a list of names"
    elif hint is bool:
        ok, wanted = isinstance(value, bool), "true or false"
    elif hint is int:
        ok, wanted = isinstance(value, int) and not isinstance(value, bool), "an integer"
    elif hint is float:
        ok, wanted = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
    else:
        ok, wanted = isinstance(value, hint), f"a {hint.__name__}"
    if not ok:
        raise UserError(f"{name.replace('_', '-')} must be {wanted}, got {value!r}")


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The settings in a ``--config`` file: a YAML (``.yaml``/``.yml``) or JSON (``.json``) mapping.

    Keys are :class:`TrainConfig` field names (``n_train``; ``n-train`` is read the same). Which
    keys a command accepts is the caller's check. Every problem is one :class:`UserError` line.
    """
    path = Path(path)
    if path.suffix.lower() not in CONFIG_SUFFIXES:
        raise UserError(f"config file {path} must end in {', '.join(CONFIG_SUFFIXES)} (YAML or JSON)")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise UserError(f"config file {path} is a folder; give a .yaml or .json file") from None
    except UnicodeDecodeError:
        raise UserError(f"config file {path} is not UTF-8 text") from None
    except OSError as exc:
        raise UserError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    if path.suffix.lower() == ".json":
        try:
            values = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"config file {path} is not valid JSON: {exc.msg} at line {exc.lineno} column "
                            f"{exc.colno}") from None
    else:
        try:
            values = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise UserError(f"config file {path} is not valid YAML: {problem}{where}") from None
    if values is None:
        raise UserError(f"config file {path} is empty; write one 'name: value' line per setting")
    if not isinstance(values, dict):
        raise UserError(f"config file {path} must be a mapping of setting names to values, not a "
                        f"{type(values).__name__}")
    return {str(key).replace("-", "_"): value for key, value in values.items()}


def config_yaml(config: TrainConfig) -> str:
    """``config`` as a YAML ``--config`` file (``oloraplus train --print-config``)."""
    return yaml.safe_dump(asdict(config), sort_keys=False)


def read_settings(path: str | Path, allowed: Collection[str], ignored: Collection[str] = ()) -> dict[str, Any]:
    """The settings of a ``--config`` file for a command that takes the fields ``allowed``.

    Keys in ``ignored`` are dropped (``evaluate`` reads a train config and skips the training
    settings); any other key that is not in ``allowed`` is a :class:`UserError` naming the key and
    the file. Text values of number and boolean settings are read as flags are (``lr: 3e-4``,
    ``ratio: 1/16``, ``compile: yes``); other values are checked by :meth:`TrainConfig.validate`.
    """
    settings = {}
    for key, value in read_config_file(path).items():
        if key in ignored:
            continue
        if key not in allowed:
            what = "does not apply to this command" if key in _FIELD_TYPES else "is not a setting"
            raise UserError(f"config file {path}: '{key}' {what}; the settings here: {', '.join(allowed)}")
        settings[key] = _from_text(key, value, path) if isinstance(value, str) else value
    return settings


def _from_text(name: str, text: str, path: str | Path) -> Any:
    """A text value of a setting as the flag would read it (numbers, booleans, a one-name list)."""
    hint = _FIELD_TYPES[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if args and (isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union):
        hint = args[0]
    try:
        if hint is Ratio:
            return float(Ratio(text))
        if hint in (int, float):
            return hint(text)
    except (ValueError, ArgumentTypeError):
        raise UserError(f"config file {path}: {name} must be {'an integer' if hint is int else 'a number'}, "
                        f"got {text!r}") from None
    if hint is bool:
        words = {"true": True, "yes": True, "on": True, "1": True,
                 "false": False, "no": False, "off": False, "0": False}
        if text.strip().lower() not in words:
            raise UserError(f"config file {path}: {name} must be true or false, got {text!r}")
        return words[text.strip().lower()]
    if typing.get_origin(hint) is list:
        return [text]
    return text
