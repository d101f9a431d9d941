"""Alpaca data: loading and validating records, the deterministic split, prompts and tokens.

Records are ``{"instruction", "input", "output"}`` dicts from a local ``.json`` list, a
``.jsonl`` file, or a hub dataset id read through ``datasets``. The split shuffles all record
indices with ``data_seed`` and takes the first ``n_train`` for training and the next ``n_eval``
for evaluation, so the two never overlap and the same flags always give the same records.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from oloraplus.errors import UserError
from oloraplus.files import sha256_file

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
            _check_unicode(value, where, i, key)
        clean.append({key: rec.get(key) or "" for key in FIELDS})
    return clean


def _check_unicode(value: str, where: str, index: int, key: str) -> None:
    """JSON allows an escaped lone surrogate ("\\ud800"); the tokenizer and every file it is written to do not."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise UserError(
            f"{where}: record {index} field '{key}' holds an unpaired surrogate {value[exc.start]!r} "
            f"at character {exc.start}; not valid Unicode text"
        ) from None


def _parse_json(text: str, path: Path, line: int | None = None):
    where = f"{path}: line {line}" if line is not None else str(path)
    try:
        return json.loads(text)
    except RecursionError:
        raise UserError(f"{where}: JSON nested too deeply to be Alpaca records") from None
    except json.JSONDecodeError as exc:
        if line is not None:
            raise UserError(f"{where} is not valid JSON ({exc.msg})") from exc
        raise UserError(f"{where}: not valid JSON ({exc.msg} at line {exc.lineno}); truncated file?") from exc


def data_sha256(data: str) -> str | None:
    """sha256 of the local data file ``data`` names, None for a hub data set (it has no file)."""
    path = local_data_file(data)
    return sha256_file(path) if path is not None else None


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
                rows.append(_parse_json(line, path, n))
        return rows
    return _parse_json(text, path)


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
