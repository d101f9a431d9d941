"""The deterministic split: indices shuffled with ``data_seed``; the first ``n_train`` train, the next
``n_eval`` eval, so the two never overlap and the same flags always give the same records."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from oloraplus.data.records import DataSource
from oloraplus.errors import UserError, check_positive


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
