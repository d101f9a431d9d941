"""Records to token ids: prompt tokens (unscored, label -100) then response tokens and EOS (each format's
``render`` in ``data.formats``), cut at ``--max-length``."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from oloraplus.data.formats import FORMATS
from oloraplus.errors import UserError, check_positive, warn


@dataclass
class Example:
    """One tokenised record: prompt tokens then response tokens (+ EOS)."""

    input_ids: list[int]
    labels: list[int]  # -100 on prompt tokens: the loss covers the response only
    prompt_len: int
    truncated: bool
    index: int = -1  # position of the record in the list it came from


def tokenize_record(record: dict, tokenizer, max_length: int, index: int = -1, format: str = "alpaca") -> Example:
    ids, labels, prompt_len = FORMATS[format].render(record, tokenizer)
    truncated = len(ids) > max_length
    return Example(ids[:max_length], labels[:max_length], min(prompt_len, max_length), truncated, index)


@dataclass
class TokenStats:
    records: int
    truncated: int
    dropped: int  # records left with no response token after truncation
    tokens: int
    response_tokens: int

    def to_dict(self) -> dict:
        return asdict(self)


def tokenize_records(records: list[dict], tokenizer, max_length: int,
                     format: str = "alpaca") -> tuple[list[Example], TokenStats]:
    """Tokenise records of ``format``; drop those whose response was cut away entirely (counted)."""
    check_positive("max_length", max_length, integer=True)
    examples = [tokenize_record(r, tokenizer, max_length, i, format) for i, r in enumerate(records)]
    kept = [e for e in examples if any(label != -100 for label in e.labels)]
    stats = TokenStats(
        records=len(examples),
        truncated=sum(e.truncated for e in examples),
        dropped=len(examples) - len(kept),
        tokens=sum(len(e.input_ids) for e in kept),
        response_tokens=sum(sum(label != -100 for label in e.labels) for e in kept),
    )
    return kept, stats


def check_kept(examples: list[Example], stats: TokenStats, what: str, data: str, max_length: int) -> None:
    """Refuse a set whose every record was dropped for length; warn when some were.

    Called right after tokenising, before the adapters are built, so a ``--max-length`` that
    leaves nothing to train on (or to evaluate) fails at once instead of after training.
    """
    if not examples:
        raise UserError(
            f"every {what} record of {data} is longer than --max-length {max_length} (the prompt leaves no "
            "room for the response); raise --max-length"
        )
    if stats.dropped:
        warn(f"{stats.dropped} of {stats.records} {what} records of {data} dropped: the prompt fills "
             f"--max-length {max_length} (counted in results.json)")
