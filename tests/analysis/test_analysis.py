"""Adapter-dynamics metrics: hand-made geometry, synthetic adapters, tiny training runs, the CLI."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from conftest import tiny_model
from peft import get_peft_model_state_dict

from oloraplus.analysis.drift import (
    analyze_adapter,
    analyze_runs,
    effective_rank,
    layer_type,
    low_rank_update,
    orthonormality_error,
    principal_angles,
    rel_change,
    subspace_drift,
    top_left_singular_vectors,
    update_in_top_subspace,
)
from oloraplus.analysis.dynamics import DynamicsCallback
from oloraplus.cli import main
from oloraplus.errors import UserError
from oloraplus.method.adapters import OLoRAPlusConfig, apply_olora, lora_layers, olora_factors
from oloraplus.method.optim import create_optimizer

D = torch.float64


def basis(n: int, *idx: int) -> torch.Tensor:
    return torch.eye(n, dtype=D)[:, list(idx)]


def random_orthogonal(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=D))
    return q


# --------------------------------------------------------------------------- principal angles


def test_identical_spans_have_zero_drift_whatever_the_basis():
    g = torch.Generator().manual_seed(0)
    u = torch.randn(10, 3, generator=g, dtype=D)
    v = u @ torch.randn(3, 3, generator=g, dtype=D)  # same span, another (non-orthonormal) basis
    sines, cosines = principal_angles(u, v)
    assert torch.allclose(cosines, torch.ones(3, dtype=D), atol=1e-12)
    assert sines.abs().max() < 1e-12
    assert subspace_drift(u, v) < 1e-20


def test_orthogonal_spans_have_drift_one():
    assert subspace_drift(basis(6, 0, 1), basis(6, 2, 3)) == pytest.approx(1.0, abs=1e-14)
    sines, cosines = principal_angles(basis(6, 0, 1), 3.0 * basis(6, 4, 5))
    assert torch.allclose(sines, torch.ones(2, dtype=D)) and cosines.abs().max() < 1e-14


@pytest.mark.parametrize("theta", [0.3, 1.0, math.pi / 2 - 0.1])
def test_rotation_in_one_plane(theta):
    # span{e0, e1} vs span{cos t e0 + sin t e2, e1}: angles (0, t), so mean sin^2 = sin^2(t) / 2.
    n = 7
    e = torch.eye(n, dtype=D)
    u = torch.stack([e[0], e[1]], 1)
    v = torch.stack([math.cos(theta) * e[0] + math.sin(theta) * e[2], e[1]], 1)
    rot = random_orthogonal(n)  # the answer must not depend on the coordinates
    sines, cosines = principal_angles(rot @ u, rot @ v)
    assert torch.allclose(sines, torch.tensor([0.0, math.sin(theta)], dtype=D), atol=1e-12)
    assert torch.allclose(cosines, torch.tensor([1.0, math.cos(theta)], dtype=D), atol=1e-12)
    assert subspace_drift(rot @ v, rot @ u) == pytest.approx(math.sin(theta) ** 2 / 2, abs=1e-12)


def test_two_angles_average_and_unequal_dimensions():
    a, b = 0.4, 1.1
    e = torch.eye(8, dtype=D)
    u = torch.stack([e[0], e[1]], 1)
    v = torch.stack([math.cos(a) * e[0] + math.sin(a) * e[2], math.cos(b) * e[1] + math.sin(b) * e[3]], 1)
    assert subspace_drift(v, u) == pytest.approx((math.sin(a) ** 2 + math.sin(b) ** 2) / 2, abs=1e-12)
    # a 1-d span inside a 3-d one: one angle, 0
    assert subspace_drift(e[:, [1]], e[:, [0, 1, 5]]) == pytest.approx(0.0, abs=1e-14)


def test_tiny_angles_stay_accurate():
    theta = 1e-9  # 1 - cos^2 would round to 0 here
    e = torch.eye(5, dtype=D)
    v = (math.cos(theta) * e[0] + math.sin(theta) * e[3])[:, None]
    sines, _ = principal_angles(e[:, [0]], v)
    assert sines[0].item() == pytest.approx(math.sin(theta), rel=1e-6)


def test_zero_matrix_has_no_span():
    assert math.isnan(subspace_drift(torch.zeros(5, 2), basis(5, 0, 1)))


# --------------------------------------------------------------------------- other pure metrics


def test_rel_change_and_orthonormality_error_by_hand():
    x0 = torch.ones(3, 4)
    xt = x0.clone()
    xt[1, 2] += 2.0
    assert rel_change(xt, x0) == pytest.approx(2 / math.sqrt(12))
    q = random_orthogonal(9)[:, :4]
    assert orthonormality_error(q) < 1e-12
    assert orthonormality_error(2 * q) == pytest.approx(3 * math.sqrt(4))  # ||4I - I||_F


def test_effective_rank_of_known_spectra():
    assert effective_rank(torch.tensor([1.0, 1.0, 1.0, 1.0])) == pytest.approx(4.0)
    assert effective_rank(torch.tensor([5.0, 0.0, 0.0])) == pytest.approx(1.0)
    # p = (1/2, 1/4, 1/4): H = 1.5 ln 2, exp(H) = 2 ** 1.5
    assert effective_rank(torch.tensor([2.0, 1.0, 1.0])) == pytest.approx(2**1.5)
    assert effective_rank(torch.zeros(3)) == 0.0


def test_low_rank_update_matches_dense_svd():
    g = torch.Generator().manual_seed(1)
    out, inn, r, s = 30, 20, 3, 2.5
    b0, a0 = torch.randn(out, r, generator=g, dtype=D), torch.randn(r, inn, generator=g, dtype=D)
    bt, at = b0 + 0.3 * torch.randn(out, r, generator=g, dtype=D), a0 + torch.randn(r, inn, generator=g, dtype=D)
    dense = s * (bt @ at - b0 @ a0)
    update = low_rank_update(bt, at, b0, a0, s)
    assert torch.allclose(update.dense(), dense, atol=1e-10)
    ref = torch.linalg.svdvals(dense)
    assert torch.allclose(update.singular_values(), ref[: 2 * r], atol=1e-10)
    assert update.norm() == pytest.approx(float(torch.linalg.norm(dense)))
    lora = low_rank_update(bt, at, torch.zeros(out, r, dtype=D), None, s)  # B_0 = 0
    assert torch.allclose(lora.singular_values(), torch.linalg.svdvals(s * bt @ at)[:r], atol=1e-10)
    assert not torch.any(low_rank_update(b0, a0, b0, a0, s).core)  # exactly zero at the start


def test_update_in_top_subspace_inside_and_outside():
    n, r = 12, 3
    u, v = random_orthogonal(n, 1), random_orthogonal(n, 2)
    w = u @ torch.diag(torch.linspace(10, 1, n, dtype=D)) @ v.T
    u_r = top_left_singular_vectors(w, r)
    assert subspace_drift(u_r, u[:, :r]) < 1e-10
    g = torch.Generator().manual_seed(0)
    a = torch.randn(r, n, generator=g, dtype=D)
    zeros = torch.zeros(n, r, dtype=D)
    inside = low_rank_update(u[:, :r] @ torch.randn(r, r, generator=g, dtype=D), a, zeros, None, 2.0)
    outside = low_rank_update(u[:, r : 2 * r], a, zeros, None, 2.0)
    assert update_in_top_subspace(inside, u_r) == pytest.approx(1.0, abs=1e-6)
    assert update_in_top_subspace(outside, u_r) == pytest.approx(0.0, abs=1e-6)
    # equal energy inside and outside: u_0 x^T + u_r y^T with ||x|| = ||y||, x orthogonal to y
    x, y = v[:, 0], v[:, 1]
    half = torch.outer(u[:, 0], x) + torch.outer(u[:, r], y)
    assert update_in_top_subspace(half, u_r) == pytest.approx(0.5, abs=1e-6)


def test_layer_types():
    assert layer_type("model.layers.0.self_attn.q_proj") == "attention"
    assert layer_type("model.decoder.layers.1.self_attn.out_proj") == "attention"
    assert layer_type("model.layers.3.mlp.down_proj") == "mlp"
    assert layer_type("model.decoder.layers.0.fc2") == "mlp"
    assert layer_type("lm_head") == "other"


# --------------------------------------------------------------------------- analyze_adapter


def synthetic_adapter(rank=3, seed=0, init="olora"):
    """Two layers with known perturbations of their start; returns (weights, state, perturbations)."""
    g = torch.Generator().manual_seed(seed)
    names = {"model.layers.0.self_attn.q_proj": (16, 12), "model.layers.0.mlp.down_proj": (12, 20)}
    weights, state, pert = {}, {}, {}
    for name, (out, inn) in names.items():
        w = torch.randn(out, inn, generator=g)
        b0, a0 = olora_factors(w, rank)
        if init == "lora":
            b0 = torch.zeros_like(b0)
        eb, ea = 0.1 * torch.randn(out, rank, generator=g), 0.2 * torch.randn(rank, inn, generator=g)
        weights[name] = w
        state[f"base_model.model.{name}.lora_B.weight"] = b0 + eb
        state[f"base_model.model.{name}.lora_A.weight"] = a0 + ea
        pert[name] = (w, b0, a0, eb, ea)
    return weights, state, pert


def test_analyze_adapter_olora_relative_changes_and_aggregates():
    rank, alpha = 3, 6.0
    weights, state, pert = synthetic_adapter(rank)
    result = analyze_adapter(weights, state, rank, alpha, "olora")
    assert list(result["layers"]) == list(pert)
    for name, (w, b0, a0, eb, ea) in pert.items():
        row = result["layers"][name]
        assert row["b_rel_change"] == pytest.approx(float(eb.norm()) / math.sqrt(rank), rel=1e-5)  # ||Q_r|| = sqrt(r)
        assert row["a_rel_change"] == pytest.approx(float(ea.norm() / a0.norm()), rel=1e-5)
        bt, at = b0 + eb, a0 + ea
        assert row["b_subspace_drift"] == pytest.approx(subspace_drift(bt, b0), rel=1e-6)
        assert row["b_orthonormality_error"] == pytest.approx(float((bt.T @ bt - torch.eye(rank)).norm()), rel=1e-4)
        dense = (alpha / rank) * (bt.double() @ at.double() - b0.double() @ a0.double())
        top = torch.linalg.svdvals(dense)[: len(row["update_singular_values"])]
        assert row["update_singular_values"] == pytest.approx(top.tolist(), rel=1e-4)
        assert row["update_rel_norm"] == pytest.approx(float(dense.norm() / w.double().norm()), rel=1e-5)
        u_r = torch.linalg.svd(w.double())[0][:, :rank]
        ref = float((u_r.T @ dense).norm() ** 2 / dense.norm() ** 2)
        assert row["update_in_top_subspace"] == pytest.approx(ref, rel=1e-4)
    agg = result["aggregate"]
    rows = list(result["layers"].values())
    assert agg["b_rel_change"] == pytest.approx(sum(r["b_rel_change"] for r in rows) / 2)
    assert agg["by_layer_type"]["attention"]["b_rel_change"] == rows[0]["b_rel_change"]
    assert agg["by_layer_type"]["mlp"]["a_rel_change"] == rows[1]["a_rel_change"]
    assert result["reference"].startswith("start factors")


def test_shared_references_give_the_same_results_and_are_reused(monkeypatch):
    """Runs of one base model share the per-layer references; a sign-flipped start must not leak."""
    import oloraplus.analysis.drift as analysis

    rank = 3
    weights, state, pert = synthetic_adapter(rank)
    flipped = {k: (-v if ".lora_B." in k else v) for k, v in state.items()}  # B and A of one pair flipped...
    flipped = {k: (-v if ".lora_A." in k else v) for k, v in flipped.items()}  # ...gives the same update
    alone = [analyze_adapter(weights, s, rank, 6.0, "olora") for s in (flipped, state)]
    calls = []
    real = analysis.layer_reference
    monkeypatch.setattr(analysis, "layer_reference", lambda *a, **k: calls.append(1) or real(*a, **k))
    shared: dict = {}
    together = [analyze_adapter(weights, s, rank, 6.0, "olora", shared) for s in (flipped, state)]
    assert together == alone
    assert len(calls) == len(pert)  # computed once per layer, not once per adapter


def test_recomputed_start_with_flipped_signs_counts_as_no_change():
    rank = 3
    weights, _, pert = synthetic_adapter(rank)
    signs = torch.tensor([1.0, -1.0, -1.0])
    state = {}
    for name, (_, b0, a0, _, _) in pert.items():  # the start, as another device's QR might give it
        state[f"base_model.model.{name}.lora_B.weight"] = b0 * signs
        state[f"base_model.model.{name}.lora_A.weight"] = a0 * signs[:, None]
    result = analyze_adapter(weights, state, rank, 6.0, "olora")
    for row in result["layers"].values():
        assert row["b_rel_change"] < 1e-6 and row["a_rel_change"] < 1e-6
        assert row["b_subspace_drift"] < 1e-12 and row["update_rel_norm"] < 1e-6
        assert row["start_sign_flips"] == 2
    assert result["aggregate"]["start_sign_flips"] == 4


def test_analyze_adapter_lora_init_uses_q_r_reference():
    rank, alpha = 3, 6.0
    weights, state, pert = synthetic_adapter(rank, init="lora")
    result = analyze_adapter(weights, state, rank, alpha, "lora")
    assert "Q_r of W" in result["reference"]
    for name, (w, _, _, eb, ea) in pert.items():
        row = result["layers"][name]
        bt, at = eb, olora_factors(w, rank)[1] + ea  # B_0 = 0 so B_T = eb
        assert row["b_rel_change"] == pytest.approx(float(eb.norm()) / math.sqrt(rank), rel=1e-5)
        assert row["a_rel_change"] is None  # PEFT's random A_0 is not saved
        assert row["b_subspace_drift"] == pytest.approx(subspace_drift(bt, olora_factors(w, rank)[0]), rel=1e-6)
        sv = torch.linalg.svdvals((alpha / rank) * bt.double() @ at.double())
        assert row["update_singular_values"] == pytest.approx(sv[:rank].tolist(), rel=1e-4)
    assert result["aggregate"]["a_rel_change"] is None


def test_analyze_adapter_rejects_mismatched_models():
    weights, state, _ = synthetic_adapter()
    with pytest.raises(UserError, match="no base weight"):
        analyze_adapter({"other": torch.zeros(2, 2)}, state, 3, 6.0, "olora")
    wrong = {k: torch.zeros(w.shape[0] + 1, w.shape[1]) for k, w in weights.items()}
    with pytest.raises(UserError, match="does not fit"):
        analyze_adapter(wrong, state, 3, 6.0, "olora")
    with pytest.raises(UserError, match="init"):
        analyze_adapter(weights, state, 3, 6.0, "loftq")


def test_analyze_adapter_pissa_against_a_hand_svd():
    """PiSSA's start rebuilt from W: B_0 = U_r sqrt(S_r / s), A_0 = sqrt(S_r / s) V_r^T (a float64 SVD here)."""
    rank, alpha = 3, 6.0
    scale = alpha / rank
    g = torch.Generator().manual_seed(1)
    weights, state, starts = {}, {}, {}
    for name, (out, inn) in {"model.layers.0.self_attn.q_proj": (16, 12), "model.layers.0.mlp.down_proj": (12, 20)}.items():
        w = torch.randn(out, inn, generator=g)
        u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
        root = torch.sqrt(s[:rank] / scale)
        b0, a0 = u[:, :rank] * root, root[:, None] * vh[:rank]
        eb, ea = 0.02 * torch.randn(out, rank, generator=g).double(), 0.02 * torch.randn(rank, inn, generator=g).double()
        weights[name] = w
        state[f"base_model.model.{name}.lora_B.weight"] = (b0 + eb).float()
        state[f"base_model.model.{name}.lora_A.weight"] = (a0 + ea).float()
        starts[name] = (w, u[:, :rank], b0, a0, eb, ea)
    result = analyze_adapter(weights, state, rank, alpha, "pissa")
    assert "span(U_r)" in result["reference"]
    for name, (w, u_r, b0, a0, eb, ea) in starts.items():
        row = result["layers"][name]
        bt, at = b0 + eb, a0 + ea
        assert row["b_rel_change"] == pytest.approx(float(eb.norm() / b0.norm()), rel=1e-4)
        assert row["a_rel_change"] == pytest.approx(float(ea.norm() / a0.norm()), rel=1e-4)
        assert row["b_subspace_drift"] == pytest.approx(subspace_drift(bt, u_r), rel=1e-3)
        assert row["start_in_top_subspace"] == pytest.approx(1.0, abs=1e-6)  # span(B_0) is span(U_r)
        assert row["b_orthonormality_error"] is None  # B_0's columns are not unit vectors
        dense = scale * (bt @ at - b0 @ a0)
        top = torch.linalg.svdvals(dense)[: len(row["update_singular_values"])]
        assert row["update_singular_values"] == pytest.approx(top.tolist(), rel=1e-3)
        assert row["update_rel_norm"] == pytest.approx(float(dense.norm() / w.double().norm()), rel=1e-3)


def test_untrained_pissa_adapter_built_by_peft_has_not_moved():
    """PEFT's own PiSSA init (not ours) is the start analyze rebuilds."""
    from peft import LoraConfig, get_peft_model

    model = tiny_model("llama")
    weights = original_weights(model)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=16, init_lora_weights="pissa", target_modules=targets))
    agg = analyze_adapter(weights, get_peft_model_state_dict(peft_model), 4, 16, "pissa")["aggregate"]
    assert agg["n_layers"] == 14
    assert agg["b_subspace_drift"] < 1e-10 and agg["b_rel_change"] < 1e-5 and agg["a_rel_change"] < 1e-5
    assert agg["update_rel_norm"] < 1e-5 and agg["b_orthonormality_error"] is None


# --------------------------------------------------------------------------- tiny training


def original_weights(model) -> dict[str, torch.Tensor]:
    return {n.removesuffix(".weight"): p.detach().clone() for n, p in model.named_parameters() if p.ndim == 2}


def train_tiny(ratio: float, steps: int = 6, rank: int = 4, init: str = "olora"):
    model = tiny_model("llama")
    weights = original_weights(model)
    peft_model = apply_olora(model, OLoRAPlusConfig(rank=rank, alpha=16, init=init))
    train_steps(peft_model, ratio, steps)
    return analyze_adapter(weights, get_peft_model_state_dict(peft_model), rank, 16, init)


def train_steps(peft_model, ratio: float, steps: int) -> None:
    """``steps`` LoRA+ steps (lr 1e-3) on one fixed random batch."""
    optimizer = create_optimizer(peft_model, lr=1e-3, ratio=ratio)
    ids = torch.randint(0, 320, (4, 16), generator=torch.Generator().manual_seed(0))
    peft_model.train()
    for _ in range(steps):
        peft_model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def test_exploration_moves_b_further_than_refinement():
    explore, refine = train_tiny(16.0)["aggregate"], train_tiny(1 / 16)["aggregate"]
    assert explore["b_subspace_drift"] > 10 * refine["b_subspace_drift"]
    assert explore["b_rel_change"] > 10 * refine["b_rel_change"]
    assert refine["b_orthonormality_error"] < explore["b_orthonormality_error"]
    assert explore["n_layers"] == 14 and set(explore["by_layer_type"]) == {"attention", "mlp"}


def test_untrained_olora_adapter_has_not_moved():
    agg = train_tiny(1.0, steps=0)["aggregate"]
    assert agg["b_subspace_drift"] < 1e-10 and agg["b_rel_change"] == 0 and agg["a_rel_change"] == 0
    assert agg["b_orthonormality_error"] < 1e-5
    assert agg["update_effective_rank"] == 0 and agg["update_in_top_subspace"] is None


class _Fixed(torch.utils.data.Dataset):
    def __init__(self, n=8, length=12):
        self.ids = torch.randint(0, 320, (n, length), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i], "attention_mask": torch.ones_like(self.ids[i])}


def test_callback_rows_during_trainer_run(tmp_path):
    from oloraplus.analysis.dynamics import attach_dynamics
    from oloraplus.method.trainer import OLoRAPlusTrainer, OLoRAPlusTrainingArguments

    model = tiny_model("llama")
    weights = original_weights(model)
    model = apply_olora(model, OLoRAPlusConfig(rank=4, alpha=16))
    args = OLoRAPlusTrainingArguments(
        output_dir=str(tmp_path / "ckpt"), max_steps=5, per_device_train_batch_size=2, learning_rate=1e-3,
        report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, logging_steps=100,
        remove_unused_columns=False, ratio=16.0,
    )
    trainer = OLoRAPlusTrainer(model=model, args=args, train_dataset=_Fixed())
    path = tmp_path / "dynamics.jsonl"
    attach_dynamics(trainer, 2, path)
    trainer.train()
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 2, 4, 5]  # start, every 2 steps, and the last step
    assert rows[0]["b_subspace_drift"] < 1e-10 and rows[0]["b_rel_change"] == 0 and rows[0]["a_rel_change"] == 0
    assert rows[-1]["b_rel_change"] > rows[1]["b_rel_change"] > 0
    assert set(rows[-1]["by_layer_type"]) == {"attention", "mlp"}
    # the live measurement agrees with the offline one, which recomputes the start from W
    offline = analyze_adapter(weights, get_peft_model_state_dict(model), 4, 16, "olora")["aggregate"]
    for key in ("b_subspace_drift", "b_rel_change", "a_rel_change", "update_in_top_subspace", "update_rel_norm"):
        assert rows[-1][key] == pytest.approx(offline[key], rel=1e-3, abs=1e-7), key


def captured(init: str, tmp_path):
    """A tiny model with ``init`` adapters (rank 4, alpha 16), its original weights, and a callback that has
    captured the start."""
    model = tiny_model("llama")
    weights = original_weights(model)
    model = apply_olora(model, OLoRAPlusConfig(rank=4, alpha=16, init=init))
    callback = DynamicsCallback(1, tmp_path / "d.jsonl")
    callback.capture(model)
    return weights, model, callback


def test_callback_pissa_start_and_offline_agree(tmp_path):
    weights, model, callback = captured("pissa", tmp_path)
    start = callback.measure(model)
    assert start["b_subspace_drift"] < 1e-10 and start["b_rel_change"] == 0 and start["a_rel_change"] == 0
    train_steps(model, 16.0, 4)
    live = callback.measure(model)
    offline = analyze_adapter(weights, get_peft_model_state_dict(model), 4, 16, "pissa")["aggregate"]
    assert live["b_subspace_drift"] > 1e-6
    for key in ("b_subspace_drift", "b_rel_change", "a_rel_change", "update_in_top_subspace", "update_rel_norm"):
        assert live[key] == pytest.approx(offline[key], rel=1e-3, abs=1e-7), key


def test_callback_lora_init_measures_against_q_r_of_w(tmp_path):
    weights, model, callback = captured("lora", tmp_path)
    start = callback.measure(model)
    assert start["b_subspace_drift"] is None and start["b_rel_change"] == 0 and start["a_rel_change"] == 0
    with torch.no_grad():  # put B exactly on 2 * Q_r of the original W: no drift, ||B|| = 2 sqrt(r)
        for name, layer in lora_layers(model).items():
            w = weights[name.removeprefix("base_model.model.")]
            layer.lora_B["default"].weight.copy_(2 * olora_factors(w, 4)[0])
    moved = callback.measure(model)
    assert moved["b_subspace_drift"] < 1e-10
    assert moved["b_rel_change"] == pytest.approx(2.0, rel=1e-5)
    assert moved["a_rel_change"] == 0


# --------------------------------------------------------------------------- CLI and run folders


@pytest.mark.slow
def test_train_and_analyze_cli(tmp_path, tiny_checkpoint, records_file, capsys):
    run = tmp_path / "run"
    code = main(["train", "--model", str(tiny_checkpoint), "--data", str(records_file), "--method", "olora-plus",
                 "--ratio", "4", "--n-train", "16", "--n-eval", "4", "--max-steps", "2", "--max-new-tokens", "4",
                 "--rank", "4", "--precision", "fp32", "--no-progress", "--output", str(run), "--batch-size", "4",
                 "--track-dynamics", "1"])
    assert code == 0
    assert [json.loads(x)["step"] for x in (run / "dynamics.jsonl").read_text().splitlines()] == [0, 1, 2]
    # a second "run" at another ratio, to get the across-runs plot
    other = tmp_path / "run-quarter"
    shutil.copytree(run, other)
    results = json.loads((other / "results.json").read_text())
    results["method"]["ratio"] = results["config"]["ratio"] = 0.25
    (other / "results.json").write_text(json.dumps(results))
    out = tmp_path / "analysis"
    capsys.readouterr()
    assert main(["analyze", str(run), str(other), "--output", str(out)]) == 0
    assert "analysis.json" in capsys.readouterr().out
    analysis = json.loads((out / "analysis.json").read_text())
    assert [r["run"] for r in analysis["runs"]] == [str(run), str(other)]
    first = analysis["runs"][0]
    assert (first["model"], first["method"], first["ratio"], first["seed"], first["init"]) == (
        str(tiny_checkpoint), "olora-plus", 4.0, 0, "olora")
    assert analysis["runs"][1]["ratio"] == 0.25
    assert len(first["layers"]) == 14 and first["aggregate"]["n_layers"] == 14
    row = first["layers"]["model.layers.0.self_attn.q_proj"]
    assert row["layer_type"] == "attention" and 0 < row["b_subspace_drift"] < 1
    assert row["b_rel_change"] > 0 and row["a_rel_change"] > 0 and row["start_sign_flips"] == 0
    for name in analysis["plots"]:
        assert (out / name).stat().st_size > 1000
    assert "plots/drift_vs_ratio.png" in analysis["plots"] and len(analysis["plots"]) == 3


def test_analyze_rejects_folders_that_are_not_runs(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["analyze", str(tmp_path / "empty"), "--output", str(tmp_path / "out")]) == 2
    assert "results.json" in capsys.readouterr().err
    (tmp_path / "noadapter").mkdir()
    (tmp_path / "noadapter" / "results.json").write_text("{}")
    with pytest.raises(UserError, match="adapter"):
        analyze_runs([tmp_path / "noadapter"], tmp_path / "out")
    assert not (tmp_path / "out" / "analysis.json").exists()


def test_track_dynamics_must_be_positive(tmp_path, capsys):
    code = main(["train", "--method", "olora", "--output", str(tmp_path / "r"), "--track-dynamics", "0"])
    assert code == 2 and "track-dynamics" in capsys.readouterr().err
