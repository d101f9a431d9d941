"""Checks of a run's data once it is tokenised, before any adapter is built or step is trained."""

from __future__ import annotations

from oloraplus.data.tokenize import check_kept
from oloraplus.errors import warn


def check_data(config, split, train=None, evaluation=None) -> None:
    """Refuse a training or eval set emptied by ``--max-length``; warn about dropped records and
    about eval records that also appear among the training records (duplicates in the file).

    ``train`` and ``evaluation`` are ``(examples, stats)`` pairs from ``tokenize_records``.
    """
    if train is not None:
        check_kept(*train, "training", config.data, config.max_length)
    if evaluation is not None:
        check_kept(*evaluation, "eval", config.data, config.max_length)
    skipped = split.provenance.get("skipped") or {}
    if any(skipped.values()):  # left out when read (formats other than alpaca): one line with every count
        too_long = sum(pair[1].dropped for pair in (train, evaluation) if pair is not None)
        total = split.provenance["n_records"] + sum(skipped.values())
        warn(f"kept {total - sum(skipped.values()) - too_long} of {total} records of {config.data}: "
             f"{skipped.get('empty', 0)} empty, {skipped.get('missing_field', 0)} missing a field, {too_long} too "
             f"long for --max-length {config.max_length} (counted in results.json data)")
    overlap = split.provenance.get("eval_in_train") or 0
    if overlap and train is not None:
        warn(f"{overlap} of the {len(split.eval)} eval records of {config.data} also appear among the training "
             "records (duplicates in the file): the eval metrics overstate generalisation")
