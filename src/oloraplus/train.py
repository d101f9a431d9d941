"""The fine-tuning recipe behind ``oloraplus train`` and ``oloraplus evaluate``.

One config dataclass, one readable function per job:
load data -> split -> load model -> add OLoRA adapters -> train with LoRA+ groups ->
evaluate -> write ``adapter/``, ``predictions.jsonl`` and, last, ``results.json``.
"""

from __future__ import annotations

import json
import math
import platform
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

from torch.utils.data import Dataset

from .adapters import OLoRAPlusConfig, apply_olora
from .attention import ATTENTIONS, attention_kernel, current_attention, use_attention
from .data import DEFAULT_DATA, Example, LengthGroupedSampler, load_records, split_records, tokenize_records
from .distributed import (gather_objects, is_main_process, local_device, per_device_batch_size,
                          ranks_finish_together, world_size)
from .errors import UserError, check_positive
from .evaluation import METRIC_MODES, collate, evaluate_model
from .files import write_json_atomic, write_text_atomic
from .models import DEFAULT_MODEL, load_model
from .runtime import (compile_layers, default_device, keep_freed_memory, merged_for_eval, prepare_for_compute,
                      resolve_precision)
from .trainer import OLoRAPlusTrainer, OLoRAPlusTrainingArguments, optimizer_groups

METHODS = {  # method -> (init, takes a ratio)
    "lora": ("lora", False),
    "olora": ("olora", False),
    "lora-plus": ("lora", True),
    "olora-plus": ("olora", True),
}


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
        if self.method not in METHODS:
            raise UserError(f"unknown method '{self.method}': choose one of {', '.join(METHODS)}")
        takes_ratio = METHODS[self.method][1]
        if takes_ratio and self.ratio is None:
            raise UserError(f"--method {self.method} needs --ratio (lambda = lr_B / lr_A), e.g. --ratio 0.25")
        if not takes_ratio and self.ratio not in (None, 1, 1.0):
            raise UserError(
                f"--method {self.method} trains A and B at one learning rate; use --method "
                f"{self.method}-plus for --ratio {self.ratio}"
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
            init=METHODS[self.method][0],
            lr=self.lr,
            ratio=self.lam,
            weight_decay=self.weight_decay,
        )


class ExampleDataset(Dataset):
    def __init__(self, examples: list[Example]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        e = self.examples[i]
        return {"input_ids": e.input_ids, "labels": e.labels}


class _Collator:
    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, rows: list[dict]) -> dict:
        return collate([Example(r["input_ids"], r["labels"], 0, False) for r in rows], self.pad_id)


def library_versions() -> dict:
    names = ["oloraplus", "torch", "transformers", "peft", "accelerate", "datasets", "sacrebleu", "rouge-score"]
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    versions["oloraplus_commit"] = source_commit()
    versions["python"] = platform.python_version()
    return versions


def source_commit(package_dir: Path | None = None) -> str | None:
    """The git commit of the oloraplus checkout that is running ("+dirty" if tracked files changed).

    None for an installed copy: only a package that sits at ``src/oloraplus`` of a git work tree
    is asked, so a virtual environment inside some other repository never reports that one's commit.
    """
    package_dir = (package_dir or Path(__file__).parent).resolve()
    root = package_dir.parent.parent
    if package_dir != root / "src" / "oloraplus":
        return None

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    if git("rev-parse", "--show-toplevel") != str(root):
        return None
    head = git("rev-parse", "HEAD")
    if head is None:
        return None
    return head + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def prepare_output(output: str, overwrite: bool, resume: bool = False) -> Path:
    """Refuse to mix a new run into a folder that already holds something."""
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise UserError(f"--output {out} is an existing file; give a folder path")
    if out.exists() and any(out.iterdir()) and not resume:
        if not overwrite:
            raise UserError(f"--output {out} is not empty; pass --overwrite to replace it, or choose another folder")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


CHECKPOINTS = "checkpoints"  # OUTPUT/checkpoints/checkpoint-N, written by the Trainer
RUN_CONFIG = "run_config.json"  # OUTPUT/checkpoints/run_config.json: the flags the checkpoints belong to
# Flags that change where, how fast or what is observed, not the results: a resumed run (or a
# resumed grid) may change them.
RESULT_NEUTRAL_FLAGS = frozenset({"output", "overwrite", "resume", "progress", "save_steps", "track_dynamics",
                                  "eval_batch_size", "generation_batch_size", "attention", "compile"})


def resume_checkpoint(config: TrainConfig) -> str | None:
    """The checkpoint ``--resume`` continues from (None without --resume).

    The newest checkpoint whose ``trainer_state.json`` (the Trainer writes it last) is readable:
    a process killed while saving leaves a folder without it, which is skipped. Read-only, so
    every process of a distributed run can call it.
    """
    if not config.resume:
        return None
    out = Path(config.output)
    if (out / "results.json").exists():
        raise UserError(f"the run in {out} is already complete (results.json exists); use --overwrite to redo it")
    folder = out / CHECKPOINTS
    steps = []
    if folder.is_dir():
        steps = [int(p.name.split("-")[1]) for p in folder.glob("checkpoint-*") if p.name.split("-")[1].isdigit()]
    for step in sorted(steps, reverse=True):
        try:
            state = json.loads((folder / f"checkpoint-{step}" / "trainer_state.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if state.get("global_step") == step:
            _check_same_run(folder / RUN_CONFIG, config)
            return str(folder / f"checkpoint-{step}")
    raise UserError(
        f"--resume: no complete checkpoint in {folder} (runs write them with --save-steps N); "
        "start the run again with --overwrite"
    )


def _check_same_run(path: Path, config: TrainConfig) -> None:
    """Refuse to continue a checkpoint with flags that would change how it trains."""
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # no record of the flags: trust the user
    now = asdict(config)
    differ = sorted(k for k in now if k in stored and k not in RESULT_NEUTRAL_FLAGS and stored[k] != now[k])
    if differ:
        detail = ", ".join(f"{k}: {stored[k]!r} there, {now[k]!r} now" for k in differ)
        raise UserError(f"--resume with other flags than the interrupted run ({detail}); use the same flags")


def load_split(config: TrainConfig):
    source = load_records(config.data)
    return split_records(source, config.n_train, config.n_eval, config.data_seed)


def train(config: TrainConfig) -> dict:
    """Fine-tune, evaluate and write the run folder. Returns the results dict."""
    from transformers import set_seed

    config.validate()
    resume_from = resume_checkpoint(config)
    # Only the main process creates or clears the folder (the others would race it).
    out = prepare_output(config.output, config.overwrite, config.resume) if is_main_process() else Path(config.output)
    if config.save_steps and not resume_from and is_main_process():
        write_json_atomic(out / CHECKPOINTS / RUN_CONFIG, asdict(config))
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    split = load_split(config)
    device = local_device(default_device())
    model, tokenizer, precision = load_base_model(config, device)
    train_examples, train_stats = tokenize_records(split.train, tokenizer, config.max_length)
    eval_examples, eval_stats = tokenize_records(split.eval, tokenizer, config.max_length)
    timings["load"] = time.perf_counter() - t0

    set_seed(config.seed)
    t = time.perf_counter()
    model = apply_olora(model, config.adapter_config())
    timings["init"] = time.perf_counter() - t
    prepare_for_compute(model, precision, device)
    if config.compile:
        compile_layers(model, device)

    trainer = build_trainer(config, model, tokenizer, train_examples, out, precision, device)
    if config.track_dynamics:
        from .analysis import attach_dynamics

        attach_dynamics(trainer, config.track_dynamics, out / "dynamics.jsonl")
    t = time.perf_counter()
    train_output = trainer.train(resume_from_checkpoint=resume_from)
    timings["train"] = time.perf_counter() - t
    steps = trainer.state.global_step
    trained_tokens = _tokens_seen(train_examples, steps, config)
    rank_groups = gather_objects(optimizer_groups(trainer.optimizer))  # every rank's LoRA+ groups
    with ranks_finish_together():  # under torchrun the other ranks wait here for rank 0
        if not is_main_process():
            return {}  # rank 0 alone evaluates and writes the run folder

        model.save_pretrained(out / "adapter")
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        metrics, predictions, details = run_evaluation(config, model, tokenizer, split, eval_examples)
        timings["eval_loss"] = details.pop("eval_loss_seconds")
        timings["predict"] = details.pop("predict_seconds")

        write_text_atomic(out / "predictions.jsonl", "".join(json.dumps(p) + "\n" for p in predictions))
        timings["total"] = time.perf_counter() - t0
        results = {
            "metrics": metrics,
            "evaluation": details,
            "config": asdict(config),
            "method": {"name": config.method, "init": METHODS[config.method][0], "ratio": config.lam,
                       "lr_A": config.lr, "lr_B": config.lr * config.lam},
            "precision": precision,
            "device": device,
            "data": {**split.provenance, "train_tokens": train_stats.to_dict(), "eval_tokens": eval_stats.to_dict()},
            "training": {
                "steps": steps,
                "train_loss": train_output.training_loss,
                "tokens": trained_tokens,
                "tokens_per_second": (_tokens_seen(train_examples, steps - _checkpoint_step(resume_from), config)
                                      / timings["train"]) if timings["train"] > 0 else None,
                "log": [row for row in trainer.state.log_history if "loss" in row],
                "lr_schedule": "linear decay, no warmup (Trainer default)",
                "trainable_parameters": trainable,
                "processes": world_size(),
                "per_device_batch_size": per_device_batch_size(config.batch_size),
                "optimizer_groups_per_rank": rank_groups,
                "resumed_from": resume_from,  # train_loss then averages the resumed steps only
            },
            "timings_seconds": timings,
            "versions": library_versions(),
        }
        write_json_atomic(out / "results.json", results)  # last: its presence marks the run complete
        return results


def _checkpoint_step(checkpoint: str | None) -> int:
    """The step a resumed run started from (0 for a fresh run)."""
    return int(Path(checkpoint).name.split("-")[-1]) if checkpoint else 0


def _tokens_seen(examples: list[Example], steps: int, config: TrainConfig) -> int:
    """Non-pad tokens processed in training (whole epochs plus the partial one)."""
    per_epoch = sum(len(e.input_ids) for e in examples)
    steps_per_epoch = math.ceil(len(examples) / config.batch_size)
    return int(per_epoch * steps / steps_per_epoch) if steps_per_epoch else 0


class RecipeTrainer(OLoRAPlusTrainer):
    """``OLoRAPlusTrainer`` with tighter length grouping (see ``data.LengthGroupedSampler``) and
    the attention kernel chosen per batch length (see ``attention.attention_kernel``)."""

    attention: str = "auto"
    device_kind: str = "cpu"

    def compute_loss(self, model, inputs, *args, **kwargs):
        use_attention(self.model, attention_kernel(self.attention, self.device_kind, inputs["input_ids"].shape[1]))
        return super().compute_loss(model, inputs, *args, **kwargs)

    def train(self, *args, **kwargs):
        """Train; afterwards the model has its own attention kernel again (evaluation is unchanged)."""
        original = current_attention(self.model)
        try:
            return super().train(*args, **kwargs)
        finally:
            use_attention(self.model, original)

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.args.train_sampling_strategy != "group_by_length" or not isinstance(dataset, ExampleDataset):
            return super()._get_train_sampler(train_dataset)
        global_batch = self.args.per_device_train_batch_size * self.args.world_size
        return LengthGroupedSampler([len(e.input_ids) for e in dataset.examples], global_batch, self.args.seed)


def build_trainer(config, model, tokenizer, examples, out: Path, precision: str, device: str) -> OLoRAPlusTrainer:
    args = OLoRAPlusTrainingArguments(
        output_dir=str(out / "checkpoints"),
        per_device_train_batch_size=per_device_batch_size(config.batch_size),  # --batch-size is global
        num_train_epochs=config.epochs,
        max_steps=config.max_steps or -1,
        learning_rate=config.lr,
        weight_decay=config.weight_decay,
        lr_scheduler_type="linear",
        warmup_steps=0,
        seed=config.seed,
        bf16=precision == "bf16",
        use_cpu=device == "cpu",
        train_sampling_strategy="group_by_length" if config.group_by_length else "random",
        # Checkpoints hold the adapter, optimizer (with its lr groups), scheduler, RNG states and
        # the data position; the last two are kept.
        save_strategy="steps" if config.save_steps else "no",
        save_steps=config.save_steps or 500,
        save_total_limit=2,
        report_to=[],
        logging_steps=10,
        remove_unused_columns=False,
        disable_tqdm=not config.progress,
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,  # under torchrun: every LoRA weight is used in each forward
        ratio=config.lam,
    )
    trainer = RecipeTrainer(
        model=model,
        args=args,
        train_dataset=ExampleDataset(examples),
        data_collator=_Collator(tokenizer.pad_token_id),
        head_on_labels_only=config.head_on_labels_only,
    )
    trainer.attention, trainer.device_kind = config.attention, device
    return trainer


def run_evaluation(config, model, tokenizer, split, eval_examples):
    """Eval loss and BLEU/ROUGE on the merged model in fp32 (see ``runtime.merged_for_eval``)."""
    references = [split.eval[e.index]["output"] for e in eval_examples]
    metrics, predictions, details = evaluate_model(
        merged_for_eval(model),
        tokenizer,
        eval_examples,
        references,
        metrics_mode=config.metrics_mode,
        max_new_tokens=config.max_new_tokens,
        batch_size=config.eval_batch_size,
        generation_batch_size=config.generation_batch_size,
        progress=config.progress,
    )
    details["precision"] = "fp32, adapters merged"
    return metrics, predictions, details


def load_base_model(config: TrainConfig, device: str):
    """The base model and tokenizer as ``train`` and ``evaluate`` run them, and the resolved precision.

    Freed memory is kept for reuse first (``runtime.keep_freed_memory``), so that the model's own
    allocations already follow that policy.
    """
    precision = resolve_precision(config.precision, device)
    keep_freed_memory(device)
    model, tokenizer = load_model(config.model, device=device)
    return model, tokenizer, precision


def evaluate_adapter(config: TrainConfig, adapter: str) -> dict:
    """Re-evaluate a saved adapter on the original base model (``oloraplus evaluate``)."""
    from peft import PeftModel

    adapter_dir = Path(adapter)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise UserError(f"{adapter_dir} is not a PEFT adapter folder (no adapter_config.json)")
    out = prepare_output(config.output, config.overwrite)
    split = load_split(config)
    device = default_device()
    model, tokenizer, precision = load_base_model(config, device)
    eval_examples, eval_stats = tokenize_records(split.eval, tokenizer, config.max_length)
    try:
        model = PeftModel.from_pretrained(model, str(adapter_dir))
    except Exception as exc:
        raise UserError(f"cannot load adapter {adapter_dir} on model '{config.model}': {exc}") from exc
    # Round the base weights exactly as training stored them, so the same function is evaluated.
    prepare_for_compute(model, precision, device)
    metrics, predictions, details = run_evaluation(config, model, tokenizer, split, eval_examples)
    write_text_atomic(out / "predictions.jsonl", "".join(json.dumps(p) + "\n" for p in predictions))
    results = {
        "metrics": metrics,
        "evaluation": details,
        "adapter": str(adapter_dir.resolve()),
        "config": asdict(config),
        "precision": precision,
        "device": device,
        "data": {**split.provenance, "eval_tokens": eval_stats.to_dict()},
        "versions": library_versions(),
    }
    write_json_atomic(out / "results.json", results)
    return results
