"""Alpaca data: loading and validating records, the deterministic split, prompts and tokens.

Records are ``{"instruction", "input", "output"}`` dicts from a local ``.json`` list, a
``.jsonl`` file, or a hub dataset id read through ``datasets``. The split shuffles all record
indices with ``data_seed`` and takes the first ``n_train`` for training and the next ``n_eval``
for evaluation, so the two never overlap and the same flags always give the same records.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch.utils.data

from .errors import UserError, check_positive
from .files import sha256_file

DEFAULT_DATA = "../shared/data/alpaca/alpaca_data.json"  # the original Alpaca file, beside the repo

FIELDS = ("instruction", "input", "output")

PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)


def format_prompt(record: dict) -> str:
    """The Stanford Alpaca prompt template, with or without the input section."""
    template = PROMPT_WITH_INPUT if record.get("input") else PROMPT_NO_INPUT
    return template.format(instruction=record["instruction"], input=record.get("input", ""))


@dataclass
class DataSource:
    records: list[dict]
    source: str
    sha256: str | None  # of the local file; None for hub data sets


def validate_records(records, where: str) -> list[dict]:
    if not isinstance(records, list):
        raise UserError(f"{where}: expected a JSON list of records, got {type(records).__name__}")
    if not records:
        raise UserError(f"{where}: holds no records")
    clean = []
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise UserError(f"{where}: record {i} is a {type(rec).__name__}, not an object")
        for key in FIELDS:
            value = rec.get(key)
            if key == "input" and value is None:
                continue  # optional: a missing or null input means "no input"
            if value is None:
                raise UserError(f"{where}: record {i} has no '{key}' field (or it is null)")
            if not isinstance(value, str):
                raise UserError(f"{where}: record {i} field '{key}' is a {type(value).__name__}, not a string")
        clean.append({key: rec.get(key) or "" for key in FIELDS})
    return clean


def _read_local(path: Path) -> list:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text (byte {exc.start})") from exc
    except OSError as exc:
        raise UserError(f"{path}: cannot read: {exc.strerror}") from exc
    if not text.strip():
        raise UserError(f"{path}: file is empty")
    if path.suffix == ".jsonl":
        rows = []
        for n, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise UserError(f"{path}: line {n} is not valid JSON ({exc.msg})") from exc
        return rows
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(
            f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}); truncated file?"
        ) from exc


def local_data_file(data: str) -> Path | None:
    """The local file ``data`` names (checked to exist), or None for a hub dataset id."""
    path = Path(data)
    if not (path.exists() or path.suffix in (".json", ".jsonl")):
        return None
    if not path.is_file():
        hint = " (the default is relative to the repo root: run from there, or pass --data)" if data == DEFAULT_DATA else ""
        raise UserError(f"data file not found: {path}{hint}")
    return path


def load_records(data: str) -> DataSource:
    """Read and validate Alpaca records from a local file or a hub dataset id."""
    path = local_data_file(data)
    if path is not None:
        records = validate_records(_read_local(path), str(path))
        return DataSource(records, str(path.resolve()), sha256_file(path))
    try:
        import datasets

        dataset = datasets.load_dataset(data, split="train")
    except Exception as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"cannot load data '{data}': not a local file, and the hub dataset could not be loaded "
            f"(offline and not cached?): {msg}"
        ) from exc
    records = validate_records([dict(r) for r in dataset], data)
    return DataSource(records, f"hub:{data}@{getattr(dataset, '_fingerprint', '')}", None)


@dataclass
class Split:
    train: list[dict]
    eval: list[dict]
    train_indices: list[int]
    eval_indices: list[int]
    provenance: dict = field(default_factory=dict)


def split_records(source: DataSource, n_train: int, n_eval: int, data_seed: int = 42) -> Split:
    """Shuffle indices with ``data_seed``; first ``n_train`` train, next ``n_eval`` eval."""
    check_positive("n_train", n_train, integer=True)
    check_positive("n_eval", n_eval, integer=True)
    total = len(source.records)
    if n_train + n_eval > total:
        raise UserError(
            f"{source.source} has {total} records, fewer than --n-train {n_train} + --n-eval {n_eval}"
        )
    order = list(range(total))
    random.Random(data_seed).shuffle(order)
    train_idx, eval_idx = order[:n_train], order[n_train : n_train + n_eval]
    provenance = {
        "source": source.source,
        "sha256": source.sha256,
        "n_records": total,
        "data_seed": data_seed,
        "n_train": n_train,
        "n_eval": n_eval,
        "train_indices": train_idx,
        "eval_indices": eval_idx,
    }
    return Split(
        [source.records[i] for i in train_idx],
        [source.records[i] for i in eval_idx],
        train_idx,
        eval_idx,
        provenance,
    )


@dataclass
class Example:
    """One tokenised record: prompt tokens then response tokens (+ EOS)."""

    input_ids: list[int]
    labels: list[int]  # -100 on prompt tokens: the loss covers the response only
    prompt_len: int
    truncated: bool
    index: int = -1  # position of the record in the list it came from


def tokenize_record(record: dict, tokenizer, max_length: int, index: int = -1) -> Example:
    prompt_ids = tokenizer(format_prompt(record), add_special_tokens=True)["input_ids"]
    response_ids = tokenizer(record["output"], add_special_tokens=False)["input_ids"]
    response_ids = response_ids + [tokenizer.eos_token_id]
    ids = prompt_ids + response_ids
    labels = [-100] * len(prompt_ids) + response_ids
    truncated = len(ids) > max_length
    return Example(ids[:max_length], labels[:max_length], min(len(prompt_ids), max_length), truncated, index)


@dataclass
class TokenStats:
    records: int
    truncated: int
    dropped: int  # records left with no response token after truncation
    tokens: int
    response_tokens: int

    def to_dict(self) -> dict:
        return asdict(self)


def tokenize_records(records: list[dict], tokenizer, max_length: int) -> tuple[list[Example], TokenStats]:
    """Tokenise records; drop those whose response was cut away entirely."""
    check_positive("max_length", max_length, integer=True)
    examples = [tokenize_record(r, tokenizer, max_length, i) for i, r in enumerate(records)]
    kept = [e for e in examples if any(label != -100 for label in e.labels)]
    stats = TokenStats(
        records=len(examples),
        truncated=sum(e.truncated for e in examples),
        dropped=len(examples) - len(kept),
        tokens=sum(len(e.input_ids) for e in kept),
        response_tokens=sum(sum(label != -100 for label in e.labels) for e in kept),
    )
    return kept, stats


class LengthGroupedSampler(torch.utils.data.Sampler):
    """Batches of records of similar length, in random order, with little padding.

    Records are shuffled into mega-batches of ``mega_batches`` batches, each mega-batch is
    sorted by length and cut into batches, and the order of all batches is shuffled. On
    Alpaca (1000 records, SmolLM2 tokens) 97% of the padded tokens are real with mega-batches of
    64 batches, against 54% for random batches and 76-95% for the Trainer's own
    ``group_by_length`` (its mega-batches shrink with small data sets). Deterministic for a
    given ``seed`` and epoch, so a resumed run sees the same order.
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int = 0, mega_batches: int = 64):
        self.lengths, self.batch_size, self.seed, self.mega = list(lengths), batch_size, seed, mega_batches
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        size = self.mega * self.batch_size
        batches = []
        for start in range(0, len(order), size):
            chunk = sorted(order[start : start + size], key=lambda i: self.lengths[i], reverse=True)
            batches += [chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        rng.shuffle(batches)
        return iter([i for batch in batches for i in batch])
