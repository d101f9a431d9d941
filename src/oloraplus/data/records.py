"""Reading data: rows from a local ``.json`` list, ``.jsonl``, ``.csv`` or ``.parquet`` file or a hub
dataset id (``datasets``, ``--split``); the default data ($OLORAPLUS_DATA, else the local Alpaca
file, else the hub's ``tatsu-lab/alpaca``); Alpaca records, their validation and prompt template.
Other formats and the choice between them: ``data.formats``.

Alpaca records are ``{"instruction", "input", "output"}`` dicts. The split shuffles all record
indices with ``data_seed`` and takes the first ``n_train`` for training and the next ``n_eval``
for evaluation, so the two never overlap and the same flags always give the same records.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from oloraplus.errors import UserError
from oloraplus.files import sha256_file

DEFAULT_DATA = "../shared/data/alpaca/alpaca_data.json"  # the original Alpaca file, beside the repo
HUB_ALPACA = "tatsu-lab/alpaca"  # the same 52,002 records, in the same order: the default when the file is absent
DATA_ENV = "OLORAPLUS_DATA"  # replaces the default data when set

LOCAL_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")

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
    format: str = "alpaca"
    skipped: dict = field(default_factory=dict)  # records left out when read: {"empty": K, "missing_field": L}
    records_sha256: str | None = None  # of the records' canonical JSON: the same for a file and its hub copy


def records_sha256(records: list[dict]) -> str:
    """sha256 of the records as canonical JSON (sorted keys, no spaces, UTF-8): compares data from any source."""
    text = json.dumps(records, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def resolve_data(data: str) -> str:
    """What ``--data`` names: the default is ``$OLORAPLUS_DATA`` if set, else the local Alpaca file if it
    is there, else the hub's ``tatsu-lab/alpaca`` (the same records in the same order)."""
    if data != DEFAULT_DATA:
        return data
    if os.environ.get(DATA_ENV):
        return os.environ[DATA_ENV]
    return DEFAULT_DATA if Path(DEFAULT_DATA).is_file() else HUB_ALPACA


def validate_records(records, where: str) -> list[dict]:
    if not isinstance(records, list):
        raise UserError(f"{where}: expected a JSON list of records, got {type(records).__name__}")
    if not records:
        raise UserError(f"{where}: holds no records")
    return [validate_record(rec, i, where) for i, rec in enumerate(records)]


def validate_record(rec, i: int, where: str) -> dict:
    """One Alpaca record, checked: ``{"instruction", "input", "output"}`` strings (a missing input is "")."""
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
        check_unicode(value, where, i, key)
    return {key: rec.get(key) or "" for key in FIELDS}


def check_unicode(value: str, where: str, index: int, key: str) -> None:
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


def _read_table(path: Path) -> list:
    """The rows of a ``.csv`` (header row: the column names; every value a string) or ``.parquet`` file."""
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise UserError(f"{path}: reading .parquet files needs pyarrow: pip install pyarrow") from None
        try:
            return pq.read_table(path).to_pylist()
        except Exception as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"{path}: not a readable parquet file ({reason})") from None
    try:
        with path.open(encoding="utf-8", newline="") as handle:
            rows = list(csv.DictReader(handle))
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text (byte {exc.start})") from exc
    except csv.Error as exc:
        raise UserError(f"{path}: not valid CSV ({exc})") from exc
    except OSError as exc:
        raise UserError(f"{path}: cannot read: {exc.strerror}") from exc
    if not rows:
        raise UserError(f"{path}: file is empty (no rows below the header)")
    return rows


def read_rows(path: Path) -> list:
    """The raw rows of a local ``.json`` (a list), ``.jsonl``, ``.csv`` or ``.parquet`` file."""
    if path.suffix in (".csv", ".parquet"):
        if path.is_file() and path.stat().st_size == 0:
            raise UserError(f"{path}: file is empty")
        return _read_table(path)
    return _read_local(path)


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
    data = resolve_data(data)
    path = Path(data)
    if not (path.exists() or path.suffix in LOCAL_SUFFIXES):
        return None
    if not path.is_file():
        hint = " (the default is relative to the repo root: run from there, or pass --data)" if data == DEFAULT_DATA else ""
        raise UserError(f"data file not found: {path}{hint}")
    return path


def read_source(data: str, split: str = "train") -> tuple[list, str, str | None]:
    """The raw rows ``data`` names, the source to record and the local file's sha256 (None from the hub)."""
    path = local_data_file(data)
    if path is not None:
        return read_rows(path), str(path.resolve()), sha256_file(path)
    name = resolve_data(data)
    try:
        import datasets

        dataset = datasets.load_dataset(name, split=split)
    except Exception as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if name == HUB_ALPACA and data == DEFAULT_DATA:
            raise UserError(
                f"no Alpaca data: {DEFAULT_DATA} is not there and the hub's {HUB_ALPACA} could not be loaded "
                f"(offline?): put alpaca_data.json at {DEFAULT_DATA} (or point ${DATA_ENV} or --data at it), "
                f"or go online once so that {HUB_ALPACA} is downloaded and cached ({msg})"
            ) from exc
        raise UserError(
            f"cannot load data '{name}': not a local file, and the hub dataset could not be loaded "
            f"(offline and not cached? wrong --split '{split}'?): {msg}"
        ) from exc
    rows = [dict(r) for r in dataset]
    if not rows:
        raise UserError(f"hub dataset '{name}' split '{split}' holds no records")
    return rows, f"hub:{name}@{getattr(dataset, '_fingerprint', '')}", None


def load_records(data: str, split: str = "train") -> DataSource:
    """Read and validate Alpaca records from a local file or a hub dataset id (other formats:
    ``data.formats.load_data``)."""
    rows, source, sha = read_source(data, split)
    path = local_data_file(data)
    records = validate_records(rows, str(path) if path is not None else resolve_data(data))
    return DataSource(records, source, sha, records_sha256=records_sha256(records))
