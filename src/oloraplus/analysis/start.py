"""Width-normalised drift and the step-0 top-r share, added to existing ``analysis.json`` files.

``oloraplus analyze`` needs the trained adapters; these numbers do not. Each layer's random
baseline and normalised drift follow from its stored drift and the shape of W, and its step-0
top-r share ``start_in_top_subspace`` = ||U_r^T Q_r||_F^2 / r from W alone (Q_r of its QR, U_r of
its SVD). :func:`augment_analysis` adds them to every layer of every run of an analysis file, from
the base model, and recomputes the aggregates: the keys and numbers a new ``analyze`` writes (see
:mod:`oloraplus.analysis.drift`), everything already there unchanged. Rerunning it is a no-op.

Command line (one base model is loaded once for all the files that name it)::

    python -m oloraplus.analysis.start results/local/analysis/analysis.json results/local/analysis/*/analysis.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from oloraplus.analysis.drift import (
    aggregate,
    layer_reference,
    normalised_drift,
    random_drift_baseline,
    start_in_top_subspace,
)
from oloraplus.errors import UserError
from oloraplus.files import write_json_atomic

# Where each new key goes in a layer's dict: right after the key named here (the order analyze writes).
_AFTER = {
    "b_subspace_drift_vs_random": "b_subspace_drift_random_baseline",
    "b_subspace_drift_per_dim": "b_subspace_drift_vs_random",
    "start_in_top_subspace": "update_in_top_subspace",
}


def _insert(layer: dict, new: dict) -> dict:
    """``layer`` with the keys of ``new`` set (new ones placed as ``_AFTER`` says, else at the end)."""
    result = {k: v for k, v in layer.items() if k not in new}
    for key, value in new.items():
        anchor = _AFTER.get(key)
        if anchor in result:
            items = list(result.items())
            at = [k for k, _ in items].index(anchor) + 1
            result = dict([*items[:at], (key, value), *items[at:]])
        else:
            result[key] = value
    return result


def start_metrics(weight: torch.Tensor, rank: int) -> dict:
    """The step-0 quantities of one layer: its random drift baseline and the top-r share of span(Q_r)."""
    ref = layer_reference(weight, rank, "olora")
    return {
        "out": int(weight.shape[0]),
        "b_subspace_drift_random_baseline": random_drift_baseline(int(weight.shape[0]), rank),
        "start_in_top_subspace": start_in_top_subspace(ref.q_r, ref.u_r),
    }


def augment_entry(entry: dict, weights: dict[str, torch.Tensor], cache: dict | None = None) -> dict:
    """One run of an analysis file with the new per-layer numbers and recomputed aggregates.

    ``weights``: the ORIGINAL base weight of every layer in ``entry["layers"]``; ``cache``: shared by
    calls on the same base model, keeps :func:`start_metrics` per (layer, rank).
    """
    rank = int(entry["rank"])
    layers = {}
    for name, layer in entry["layers"].items():
        if name not in weights:
            raise UserError(f"layer '{name}' of run {entry.get('run')} is not in the base model {entry.get('model')}")
        key = (name, rank)
        start = cache.get(key) if cache is not None else None
        if start is None:
            start = start_metrics(weights[name], rank)
            if cache is not None:
                cache[key] = start
        if start["b_subspace_drift_random_baseline"] != layer.get("b_subspace_drift_random_baseline"):
            raise UserError(f"layer '{name}' of run {entry.get('run')} does not have the shape of the base weight")
        vs_random, per_dim = normalised_drift(layer.get("b_subspace_drift"), start["out"], rank)
        layers[name] = _insert(layer, {"b_subspace_drift_vs_random": vs_random, "b_subspace_drift_per_dim": per_dim,
                                       "start_in_top_subspace": start["start_in_top_subspace"]})
    return {**entry, "aggregate": aggregate(layers), "layers": layers}


def _module_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: m.weight for name, m in model.named_modules() if isinstance(getattr(m, "weight", None), torch.Tensor)
            and m.weight.dim() == 2}


def augment_analysis(paths: list[str | Path], device: str | None = None) -> list[Path]:
    """Rewrite each ``analysis.json`` with :func:`augment_entry` applied to every run; returns the paths.

    Each base model named by a run is loaded once (``oloraplus.models.loading.load_model``, on
    ``device``, default the CPU). Every file is read and checked before any is written.
    """
    from oloraplus.models.loading import load_model

    files = [Path(p) for p in paths]
    data = {}
    for path in files:
        try:
            data[path] = json.loads(path.read_text(encoding="utf-8"))
            data[path]["runs"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise UserError(f"{path}: not an analysis.json written by 'oloraplus analyze' ({exc})") from exc
    models = dict.fromkeys(e["model"] for d in data.values() for e in d["runs"] if e)
    for model_name in models:
        model, _ = load_model(model_name, device=device or "cpu")
        weights, cache = _module_weights(model), {}
        for d in data.values():
            d["runs"] = [augment_entry(e, weights, cache) if e and e["model"] == model_name else e for e in d["runs"]]
        del model
    for path, d in data.items():
        write_json_atomic(path, d, indent=None)  # the format analyze writes
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m oloraplus.analysis.start", description=__doc__.split("\n\n")[0])
    parser.add_argument("analysis", nargs="+", help="analysis.json files written by 'oloraplus analyze' (rewritten)")
    parser.add_argument("--device", default=None, help="where the base models' SVDs run (default: cpu)")
    args = parser.parse_args(argv)
    try:
        for path in augment_analysis(args.analysis, args.device):
            print(f"updated {path}")
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
