"""The deterministic split: indices shuffled with ``data_seed``; the first ``n_train`` train, the next
``n_eval`` eval, so the two never overlap and the same flags always give the same records.

A validation set (``n_val`` > 0) is carved from the training records: the last ``n_val`` of the
``n_train`` training indices, so training uses the first ``n_train - n_val``. The eval records
are the same whatever ``n_val`` is, and ``n_val = 0`` gives exactly the split without validation."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field

from oloraplus.data.records import FIELDS, DataSource
from oloraplus.errors import UserError, check_positive


@dataclass
class Split:
    train: list[dict]
    eval: list[dict]
    train_indices: list[int]
    eval_indices: list[int]
    provenance: dict = field(default_factory=dict)
    val: list[dict] = field(default_factory=list)  # carved from the training records (n_val > 0)
    val_indices: list[int] = field(default_factory=list)


def split_records(source: DataSource, n_train: int, n_eval: int, data_seed: int = 42, n_val: int = 0) -> Split:
    """Shuffle indices with ``data_seed``; first ``n_train`` train, next ``n_eval`` eval; the last
    ``n_val`` of the train indices are validation instead (training keeps ``n_train - n_val``)."""
    check_positive("n_train", n_train, integer=True)
    check_positive("n_eval", n_eval, integer=True)
    check_n_val(n_val, n_train)
    total = len(source.records)
    if n_train + n_eval > total:
        raise UserError(
            f"{source.source} has {total} records, fewer than --n-train {n_train} + --n-eval {n_eval}"
        )
    order = list(range(total))
    random.Random(data_seed).shuffle(order)
    train_idx, eval_idx = order[:n_train], order[n_train : n_train + n_eval]
    train_idx, val_idx = train_idx[: n_train - n_val], train_idx[n_train - n_val :]
    provenance = {
        "source": source.source,
        "sha256": source.sha256,
        "n_records": total,
        "data_seed": data_seed,
        "n_train": n_train,
        "n_eval": n_eval,
        "train_indices": train_idx,
        "eval_indices": eval_idx,
        "eval_in_train": eval_in_train(source.records, train_idx, eval_idx),
    }
    if n_val:  # absent without validation: results.json of such runs is unchanged
        provenance.update(n_val=n_val, val_indices=val_idx,
                          val_from=f"the last {n_val} of the {n_train} --n-train records; training uses the "
                                   f"other {n_train - n_val}")
    return Split(
        [source.records[i] for i in train_idx],
        [source.records[i] for i in eval_idx],
        train_idx,
        eval_idx,
        provenance,
        [source.records[i] for i in val_idx],
        val_idx,
    )


def check_n_val(n_val: int, n_train: int) -> None:
    """``n_val`` validation records carved from ``n_train``: from 0 up to, not including, ``n_train``."""
    if isinstance(n_val, bool) or not isinstance(n_val, int) or n_val < 0:
        raise UserError(f"--n-val must be a whole number of records (0: no validation), got {n_val!r}")
    if n_val >= n_train:
        raise UserError(f"--n-val {n_val} takes every one of the --n-train {n_train} records; the validation "
                        f"records are carved from the training ones, so --n-val must be below --n-train")


def eval_in_train(records: list[dict], train_idx: list[int], eval_idx: list[int]) -> int:
    """How many eval records have the same content as a training record (duplicates in the file)."""
    seen = {_content(records[i]) for i in train_idx}
    return sum(_content(records[i]) in seen for i in eval_idx)


def _content(record: dict) -> str:
    """A record's content as one comparable value (Alpaca: its three fields; any format: all its keys)."""
    return json.dumps(record if set(record) - set(FIELDS) else {k: record.get(k) for k in FIELDS}, sort_keys=True)
