"""Batches: padding (``collate``), the Trainer-facing dataset and collator, and length-grouped sampling."""

from __future__ import annotations

import random

import torch
import torch.utils.data
from torch.utils.data import Dataset

from oloraplus.data.tokenize import Example


class LengthGroupedSampler(torch.utils.data.Sampler):
    """Batches of records of similar length, in random order, with little padding.

    Records are shuffled into mega-batches of ``mega_batches`` batches, each mega-batch is
    sorted by length and cut into batches, and the order of all batches is shuffled. Less padding
    than random batches or the Trainer's own ``group_by_length``, whose mega-batches shrink with
    small data sets (the measured shares of real tokens: bench/NOTES.md). Deterministic for a
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


IGNORE = -100


def collate(examples: list[Example], pad_id: int, left: bool = False) -> dict[str, torch.Tensor]:
    """Pad a batch to its longest example (right padding, or left for generation)."""
    width = max(len(e.input_ids) for e in examples)
    ids, labels, mask = [], [], []
    for e in examples:
        pad = width - len(e.input_ids)
        if left:
            ids.append([pad_id] * pad + e.input_ids)
            labels.append([IGNORE] * pad + e.labels)
            mask.append([0] * pad + [1] * len(e.input_ids))
        else:
            ids.append(e.input_ids + [pad_id] * pad)
            labels.append(e.labels + [IGNORE] * pad)
            mask.append([1] * len(e.input_ids) + [0] * pad)
    return {
        "input_ids": torch.tensor(ids),
        "labels": torch.tensor(labels),
        "attention_mask": torch.tensor(mask),
    }


class ExampleDataset(Dataset):
    def __init__(self, examples: list[Example]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        e = self.examples[i]
        return {"input_ids": e.input_ids, "labels": e.labels}


class Collator:
    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, rows: list[dict]) -> dict:
        return collate([Example(r["input_ids"], r["labels"], 0, False) for r in rows], self.pad_id)


def length_sorted_batches(examples: list[Example], batch_size: int, key=None) -> list[list[int]]:
    key = key or (lambda e: len(e.input_ids))
    order = sorted(range(len(examples)), key=lambda i: key(examples[i]))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
