"""Random-subspace baselines, width-normalised drift and the step-0 top-r share (issue #20 item 4)."""

from __future__ import annotations

import json
import math
import statistics

import pytest
import torch
from test_analysis import synthetic_adapter

from oloraplus.analysis.drift import (
    analyze_adapter,
    layer_reference,
    normalised_drift,
    random_drift_baseline,
    start_in_top_subspace,
    subspace_drift,
)
from oloraplus.analysis.start import augment_entry, main, start_metrics
from oloraplus.errors import UserError

D = torch.float64


def random_subspace(d: int, r: int, g: torch.Generator) -> torch.Tensor:
    """An orthonormal basis of a uniformly random r-dim subspace of R^d (QR of a Gaussian matrix)."""
    return torch.linalg.qr(torch.randn(d, r, generator=g, dtype=D))[0]


@pytest.mark.parametrize(("d", "r"), [(12, 3), (40, 8), (24, 20)])
def test_random_baseline_is_the_monte_carlo_mean_drift(d, r):
    g = torch.Generator().manual_seed(d * 100 + r)
    fixed = torch.eye(d, dtype=D)[:, :r]
    drifts = [subspace_drift(random_subspace(d, r, g), fixed) for _ in range(3000)]
    mc, se = statistics.fmean(drifts), statistics.stdev(drifts) / math.sqrt(len(drifts))
    assert abs(mc - random_drift_baseline(d, r)) < 4 * se
    assert abs(mc - (1 - r / d) ** 2) > 8 * se  # the test separates the formula from a near miss


def test_random_baseline_values_and_limits():
    assert random_drift_baseline(576, 32) == pytest.approx(0.9444444444)
    assert random_drift_baseline(192, 32) == pytest.approx(5 / 6)
    assert random_drift_baseline(8, 8) == 0.0  # the only 8-dim subspace of R^8
    with pytest.raises(ValueError):
        random_drift_baseline(4, 8)


def test_normalised_drift_by_hand():
    assert normalised_drift(0.01, 576, 32) == pytest.approx((0.01 / (1 - 32 / 576), 0.01 / 544))
    assert normalised_drift(None, 576, 32) == (None, None)
    assert normalised_drift(0.0, 32, 32) == (None, None)  # r = out: no baseline, nothing to turn into


def test_per_dim_drift_removes_the_width_that_raw_drift_carries():
    """The same per-entry movement of B drifts ~width times more in a wider layer; per dimension it is equal."""
    g = torch.Generator().manual_seed(0)
    r, c = 4, 1e-3
    raw, per_dim = {}, {}
    for d in (64, 512):
        q = random_subspace(d, r, g)
        drift = statistics.fmean(subspace_drift(q + c * torch.randn(d, r, generator=g, dtype=D), q) for _ in range(20))
        raw[d], per_dim[d] = drift, normalised_drift(drift, d, r)[1]
    assert raw[512] / raw[64] == pytest.approx((512 - r) / (64 - r), rel=0.1)
    assert per_dim[512] / per_dim[64] == pytest.approx(1.0, rel=0.1)
    assert per_dim[64] == pytest.approx(c**2, rel=0.1)  # about c^2 per entry


def hand_share(w: torch.Tensor, r: int) -> float:
    """||U_r^T Q_r||_F^2 / r with Q from the QR of W and U from its SVD, as written in the issue."""
    q, _ = torch.linalg.qr(w.double())
    u, _, _ = torch.linalg.svd(w.double())
    return float(((u[:, :r].T @ q[:, :r]) ** 2).sum() / r)


@pytest.mark.parametrize(("out", "inn", "r"), [(10, 7, 3), (6, 12, 2), (30, 30, 5)])
def test_step0_top_r_share_matches_a_hand_computation(out, inn, r):
    w = torch.randn(out, inn, generator=torch.Generator().manual_seed(out + inn + r))
    ref = layer_reference(w, r, "olora")
    share = start_in_top_subspace(ref.q_r, ref.u_r)
    assert share == pytest.approx(hand_share(w, r), rel=1e-5)
    assert share == pytest.approx(1 - subspace_drift(ref.q_r, ref.u_r), rel=1e-5)  # mean cos^2 of the angles
    assert start_metrics(w, r)["start_in_top_subspace"] == share


def test_step0_top_r_share_extremes():
    u = torch.linalg.qr(torch.randn(8, 8, generator=torch.Generator().manual_seed(1), dtype=D))[0]
    v = torch.eye(6, dtype=D)
    sigma = torch.zeros(8, 6, dtype=D)
    sigma[range(6), range(6)] = torch.tensor([9.0, 8, 7, 3, 2, 1], dtype=D)
    w = (u @ sigma @ v.T).float()  # columns 0-2 are the top-3 singular directions
    ref = layer_reference(w, 3, "olora")
    assert start_in_top_subspace(ref.q_r, ref.u_r) == pytest.approx(1.0, abs=1e-5)
    w_low = w[:, [3, 4, 5, 0, 1, 2]]  # same singular vectors, but the first columns are the bottom ones
    ref = layer_reference(w_low, 3, "olora")
    assert start_in_top_subspace(ref.q_r, ref.u_r) == pytest.approx(0.0, abs=1e-5)


def test_analyze_writes_the_new_metrics_per_layer_and_in_the_aggregate():
    rank = 3
    weights, state, _ = synthetic_adapter(rank)
    result = analyze_adapter(weights, state, rank, 6.0, "olora")
    for name, row in result["layers"].items():
        out = weights[name].shape[0]
        assert row["b_subspace_drift_vs_random"] == pytest.approx(row["b_subspace_drift"] / (1 - rank / out))
        assert row["b_subspace_drift_per_dim"] == pytest.approx(row["b_subspace_drift"] / (out - rank))
        assert row["start_in_top_subspace"] == pytest.approx(hand_share(weights[name], rank), rel=1e-5)
    agg, rows = result["aggregate"], list(result["layers"].values())
    assert agg["start_in_top_subspace"] == pytest.approx(statistics.fmean(r["start_in_top_subspace"] for r in rows))
    assert agg["by_layer_type"]["mlp"]["b_subspace_drift_per_dim"] == rows[1]["b_subspace_drift_per_dim"]


NEW_KEYS = ("b_subspace_drift_vs_random", "b_subspace_drift_per_dim", "start_in_top_subspace")


def old_entry(result: dict, rank: int) -> dict:
    """An analysis entry as analyze wrote it before these metrics existed."""
    layers = {n: {k: v for k, v in row.items() if k not in NEW_KEYS} for n, row in result["layers"].items()}
    agg = {k: v for k, v in result["aggregate"].items() if k not in NEW_KEYS}
    agg["by_layer_type"] = {t: {k: v for k, v in m.items() if k not in NEW_KEYS} for t, m in agg["by_layer_type"].items()}
    return {"run": "r", "model": "m", "rank": rank, **{k: result[k] for k in ("init", "reference")},
            "aggregate": agg, "layers": layers}


def test_augmenting_an_old_entry_gives_what_analyze_writes_now():
    rank = 3
    weights, state, _ = synthetic_adapter(rank)
    result = analyze_adapter(weights, state, rank, 6.0, "olora")
    entry = old_entry(result, rank)
    cache: dict = {}
    new = augment_entry(entry, weights, cache)
    assert json.dumps(new["layers"]) == json.dumps(result["layers"])  # same keys, same order, same numbers
    assert new["aggregate"] == result["aggregate"]
    assert len(cache) == 2 and augment_entry(new, weights, cache) == new  # idempotent, reuses the cache
    assert "b_subspace_drift_per_dim" not in entry["layers"][next(iter(weights))]  # the input is not modified


def test_augmenting_with_the_wrong_base_model_is_refused():
    weights, state, _ = synthetic_adapter(3)
    entry = old_entry(analyze_adapter(weights, state, 3, 6.0, "olora"), 3)
    with pytest.raises(UserError, match="not in the base model"):
        augment_entry(entry, {}, None)
    other = {name: torch.randn(w.shape[0] + 1, w.shape[1]) for name, w in weights.items()}
    with pytest.raises(UserError, match="shape"):
        augment_entry(entry, other, None)


def test_command_line_refuses_a_file_that_is_not_an_analysis(tmp_path, capsys):
    bad = tmp_path / "analysis.json"
    bad.write_text("{\"not\": 1}")
    assert main([str(bad)]) == 2
    assert "not an analysis.json" in capsys.readouterr().err
    assert bad.read_text() == "{\"not\": 1}"
