"""Adapter dynamics: does B keep OLoRA's orthonormal directions, or move to new ones?

The OLoRA+ claim under test: with ``ratio`` (lambda = lr_B / lr_A) below 1 the adapter keeps the
orthonormal basis B_0 = Q_r that OLoRA starts from and learns how to combine it (A moves, B stays);
above 1 it moves B to new directions. This module turns that into numbers, per adapted layer:

- ``b_subspace_drift``: mean sin^2 of the principal angles between span(B_T) and the reference
  subspace span(Q_r), where W = QR is the ORIGINAL weight (under PiSSA span(U_r), the span of its
  B_0; see below). 0: same span; 1: orthogonal spans.
  A random r-dimensional subspace of R^out scores 1 - r/out on average
  (``b_subspace_drift_random_baseline``, :func:`random_drift_baseline`), which is the scale to read
  the numbers against. Layers of different widths are compared with two normalised forms:
  ``b_subspace_drift_vs_random`` = drift / (1 - r/out) (the fraction of the way to a random
  subspace) and ``b_subspace_drift_per_dim`` = drift / (out - r), drift per direction of the
  complement of span(Q_r) that B can turn into. A small movement of B by about c per entry gives a
  drift of about (out - r) c^2, so a raw drift grows with the layer's width; the per-dimension form
  does not.
- ``b_rel_change`` = ||B_T - B_0||_F / ||B_0||_F and ``a_rel_change`` likewise for A.
- ``b_orthonormality_error`` = ||B_T^T B_T - I||_F (0 for OLoRA's start).
- the update delta = s (B_T A_T - B_0 A_0), s = alpha / r, i.e. what training added to W:
  its top singular values, entropy effective rank, norm relative to ||W||_F, and
  ``update_in_top_subspace`` = ||U_r^T delta||_F^2 / ||delta||_F^2, the fraction of its energy in the
  span of W's top-r left singular vectors, and its step-0 counterpart ``start_in_top_subspace`` =
  ||U_r^T Q_r||_F^2 / r: the same share for an update whose columns span(Q_r) evenly (what an update
  B_0 ΔA with B held still is, on average over ΔA), i.e. how much span(Q_r) already overlaps
  span(U_r) before training. A random r-dimensional subspace scores r/out on it.

Reference under each initialisation:

- OLoRA init (``init="olora"``): B_0 = Q_r, A_0 = R_r = Q_r^T W, recomputed from the original W
  with :func:`oloraplus.adapters.olora_factors` (or captured at step 0 by :class:`DynamicsCallback`).
- PEFT's default LoRA init (``init="lora"``): B_0 = 0 has no span, so the drift of span(B_T) is
  measured against the same Q_r of W (what OLoRA would have started from; for LoRA this is close
  to the random baseline), ``b_rel_change`` is ||B_T||_F / ||Q_r||_F = ||B_T||_F / sqrt(r) (how far B
  got, on the scale OLoRA's B starts at, so the two inits are comparable), and ``a_rel_change`` is
  None offline because PEFT's random A_0 is not saved (the callback, which sees A_0, reports it).
  The update is delta = s B_T A_T exactly, since B_0 A_0 = 0.

- PiSSA init (``init="pissa"``): B_0 = U_r sqrt(S_r / s), A_0 = sqrt(S_r / s) V_r^T, recomputed from
  the original W with :func:`oloraplus.adapters.pissa_factors` (the SVD PEFT runs). span(B_0) is W's
  top-r left singular subspace span(U_r), so the drift is measured against it (and
  ``start_in_top_subspace`` is 1 by construction), ``b_rel_change``/``a_rel_change`` against B_0 / A_0
  as for OLoRA; ``b_orthonormality_error`` is None, since B_0's columns are not unit vectors.

Other inits are refused with a :class:`UserError`: their start is not one of these references, and
measuring them against one would report a drift that is not there.

All small linear algebra runs in float64 on the CPU; only the SVD of each full weight (for U_r)
runs where the weight lives, in float32.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from oloraplus.errors import UserError, check_positive
from oloraplus.files import write_json_atomic
from oloraplus.method.adapters import init_for_peft_value, load_adapter_weights, olora_factors, pissa_factors

ATTENTION_MODULES = {"q_proj", "k_proj", "v_proj", "o_proj", "out_proj", "qkv_proj"}

MLP_MODULES = {"gate_proj", "up_proj", "down_proj", "fc1", "fc2", "gate_up_proj"}

REFERENCES = {
    "olora": "start factors B_0 = Q_r, A_0 = R_r of W (OLoRA init); drift against span(Q_r)",
    "lora": "Q_r of W (B_0 = 0 under LoRA init); b_rel_change relative to ||Q_r||_F = sqrt(r)",
    "pissa": "start factors B_0 = U_r sqrt(S_r/s), A_0 = sqrt(S_r/s) V_r^T of W (PiSSA init); drift against span(U_r)",
}

# Per-layer scalars that are averaged into the aggregate.
SCALAR_METRICS = (
    "b_subspace_drift",
    "b_subspace_drift_random_baseline",
    "b_subspace_drift_vs_random",
    "b_subspace_drift_per_dim",
    "b_rel_change",
    "a_rel_change",
    "b_orthonormality_error",
    "update_effective_rank",
    "update_in_top_subspace",
    "start_in_top_subspace",
    "update_rel_norm",
)

N_SINGULAR_VALUES = 8

WORK_DTYPE = torch.float64

_KEY_PREFIX = re.compile(r"^base_model\.model\.")

_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<layer>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")


def to_work_dtype(x: torch.Tensor) -> torch.Tensor:
    return x.detach().to(device="cpu", dtype=WORK_DTYPE)


def orthonormal_basis(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis (reduced QR) of the column span of ``x``, in float64."""
    q, _ = torch.linalg.qr(to_work_dtype(x), mode="reduced")
    return q


def principal_angles(u: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sines and cosines of the principal angles between span(u) and span(v), smallest angle first.

    Both inputs are orthonormalised with QR first, so any bases of the two spans give the same
    answer. There are min(dim u, dim v) angles. Cosines are the singular values of Qu^T Qv; sines
    are the singular values of the residual Qs - Ql (Ql^T Qs) of the smaller span against the
    larger, which keeps small angles accurate (1 - cos^2 would lose them to rounding).
    """
    if u.shape[0] != v.shape[0]:
        raise ValueError(f"spans live in different spaces: {tuple(u.shape)} vs {tuple(v.shape)}")
    qu, qv = orthonormal_basis(u), orthonormal_basis(v)
    small, large = (qu, qv) if qu.shape[1] <= qv.shape[1] else (qv, qu)
    cosines = torch.linalg.svdvals(small.T @ large).clamp(0.0, 1.0)  # descending
    residual = small - large @ (large.T @ small)
    sines = torch.linalg.svdvals(residual).clamp(0.0, 1.0).flip(0)  # ascending
    return sines, cosines


def subspace_drift(b_t: torch.Tensor, b_0: torch.Tensor) -> float:
    """Mean sin^2 of the principal angles between span(b_t) and span(b_0), in [0, 1].

    0 when the spans agree, 1 when they are orthogonal. NaN when either matrix is zero (no span).
    """
    if not torch.any(b_t) or not torch.any(b_0):
        return math.nan
    sines, _ = principal_angles(b_t, b_0)
    return float((sines**2).mean())


def random_drift_baseline(out: int, rank: int) -> float:
    """E[:func:`subspace_drift`] between a fixed and a uniformly random ``rank``-dim subspace of R^out: 1 - r/out.

    The drift is 1 - ||P_U V||_F^2 / r for orthonormal bases U (random) and V (fixed); over the
    uniform (Haar) distribution E[P_U] = (r/out) I, so E||P_U V||_F^2 = r^2/out. Needs 1 <= r <= out.
    """
    check_positive("rank", rank, integer=True)
    if rank > out:
        raise ValueError(f"rank {rank} exceeds the dimension {out}")
    return 1.0 - rank / out


def normalised_drift(drift: float | None, out: int, rank: int) -> tuple[float | None, float | None]:
    """(drift / random baseline, drift / (out - r)) of a layer with ``out`` outputs at rank r.

    None where the drift is None; the per-dimension form is None when r = out (nothing to turn into).
    """
    if drift is None:
        return None, None
    baseline = random_drift_baseline(out, rank)
    return (drift / baseline if baseline > 0 else None), (drift / (out - rank) if out > rank else None)


def start_in_top_subspace(q_r: torch.Tensor, u_r: torch.Tensor) -> float:
    """||U_r^T Q_r||_F^2 / ||Q_r||_F^2: the step-0 share of span(Q_r) in span(U_r), in [0, 1].

    The :func:`update_in_top_subspace` of Q_r itself taken as the update (for orthonormal Q_r it is
    the mean cos^2 of the principal angles between span(Q_r) and span(U_r), i.e. 1 - their drift).
    """
    return update_in_top_subspace(to_work_dtype(q_r), u_r)


def rel_change(x_t: torch.Tensor, x_0: torch.Tensor) -> float:
    """||x_t - x_0||_F / ||x_0||_F (NaN when x_0 is zero)."""
    x_t, x_0 = to_work_dtype(x_t), to_work_dtype(x_0)
    denom = torch.linalg.norm(x_0)
    return float(torch.linalg.norm(x_t - x_0) / denom) if denom > 0 else math.nan


def orthonormality_error(b: torch.Tensor) -> float:
    """||B^T B - I||_F: 0 for orthonormal columns (OLoRA's B_0), 3 sqrt(r) for 2 Q."""
    b = to_work_dtype(b)
    return float(torch.linalg.norm(b.T @ b - torch.eye(b.shape[1], dtype=b.dtype)))


@dataclass
class LowRankUpdate:
    """delta = left @ core @ right.T with orthonormal ``left`` (out x k) and ``right`` (in x m).

    Everything about delta that is invariant under orthogonal maps (singular values, Frobenius
    norm, its projection on a subspace of the output space) is read off the small ``core``.
    """

    left: torch.Tensor
    core: torch.Tensor
    right: torch.Tensor

    def singular_values(self) -> torch.Tensor:
        return torch.linalg.svdvals(self.core)

    def norm(self) -> float:
        return float(torch.linalg.norm(self.core))

    def dense(self) -> torch.Tensor:
        return self.left @ self.core @ self.right.T


def low_rank_update(
    b_t: torch.Tensor, a_t: torch.Tensor, b_0: torch.Tensor, a_0: torch.Tensor | None, scaling: float
) -> LowRankUpdate:
    """delta = s (B_T A_T - B_0 A_0) in factored form, without forming the out x in matrix.

    Written as s [B_T - B_0, B_0] [A_T; A_T - A_0] (exact algebra), so a small change is computed
    from the small differences rather than by cancelling two large products, and delta is exactly
    zero at step 0. QR of the stacked factors, L = Q1 R1 and Rm^T = Q2 R2, gives
    delta = Q1 (s R1 R2^T) Q2^T: one SVD of a 2r x 2r core instead of out x in.
    ``a_0=None`` with ``b_0 = 0`` (LoRA init) means delta = s B_T A_T.
    """
    b_t, a_t, b_0 = to_work_dtype(b_t), to_work_dtype(a_t), to_work_dtype(b_0)
    if a_0 is None:
        if torch.any(b_0):
            raise ValueError("a_0 is needed when b_0 is not zero")
        left, right = b_t, a_t
    else:
        a_0 = to_work_dtype(a_0)
        left = torch.cat([b_t - b_0, b_0], dim=1)
        right = torch.cat([a_t, a_t - a_0], dim=0)
    q1, r1 = torch.linalg.qr(left, mode="reduced")
    q2, r2 = torch.linalg.qr(right.T, mode="reduced")
    return LowRankUpdate(q1, scaling * (r1 @ r2.T), q2)


def effective_rank(singular_values: torch.Tensor) -> float:
    """Entropy effective rank exp(H(p)), p = sigma / sum(sigma) (Roy & Vetterli, 2007).

    Equals k for k equal non-zero singular values and 1 for a rank-one matrix; 0 for a zero matrix.
    """
    s = to_work_dtype(singular_values).clamp_min(0.0)
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s[s > 0] / total
    return float(torch.exp(-(p * p.log()).sum()))


def top_left_singular_vectors(weight: torch.Tensor, rank: int) -> torch.Tensor:
    """U_r: the top-``rank`` left singular vectors of ``weight`` (SVD in float32 where it lives)."""
    w = weight.detach().to(torch.float32)
    if w.device.type == "mps":  # no SVD there
        w = w.cpu()
    u, _, _ = torch.linalg.svd(w, full_matrices=False)
    return to_work_dtype(u[:, :rank])


def span_basis(b: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis of span(b)'s columns (QR, in the work dtype): U_r for PiSSA's B_0 = U_r sqrt(S_r / s)."""
    return torch.linalg.qr(to_work_dtype(b))[0]


def update_in_top_subspace(update: LowRankUpdate | torch.Tensor, u_r: torch.Tensor) -> float:
    """||U_r^T delta||_F^2 / ||delta||_F^2: share of the update's energy in span(U_r), in [0, 1].

    NaN for a zero update. ``u_r`` must have orthonormal columns.
    """
    u_r = to_work_dtype(u_r)
    if isinstance(update, LowRankUpdate):
        total = update.norm() ** 2
        inside = float(torch.linalg.norm(u_r.T @ update.left @ update.core)) ** 2
    else:
        delta = to_work_dtype(update)
        total = float(torch.linalg.norm(delta)) ** 2
        inside = float(torch.linalg.norm(u_r.T @ delta)) ** 2
    return inside / total if total > 0 else math.nan


def layer_type(name: str) -> str:
    """"attention", "mlp" or "other", from the module's own name (the last dotted part)."""
    short = name.rsplit(".", 1)[-1]
    if short in ATTENTION_MODULES:
        return "attention"
    if short in MLP_MODULES:
        return "mlp"
    return "other"


@dataclass
class LayerReference:
    """What one layer's trained factors are compared with (all float64, CPU).

    ``b_0``/``a_0``: the start (zeros / None under LoRA init when A_0 is unknown); ``q_r``: an
    orthonormal basis of the reference subspace (Q_r of the original W; U_r under PiSSA, the span of
    its B_0); ``u_r``: W's top-r left singular vectors; ``w_norm``: ||W||_F.
    """

    init: str
    b_0: torch.Tensor
    a_0: torch.Tensor | None
    q_r: torch.Tensor
    u_r: torch.Tensor
    w_norm: float


def layer_reference(weight: torch.Tensor, rank: int, init: str, a_0: torch.Tensor | None = None,
                    scaling: float | None = None) -> LayerReference:
    """The reference for a layer whose ORIGINAL (pre-adapter) weight is ``weight``; ``scaling``
    (s = alpha / r) is needed under PiSSA, whose start depends on it."""
    if init not in REFERENCES:
        raise UserError(f"init must be one of {', '.join(REFERENCES)}, got '{init}'")
    w_norm = float(torch.linalg.norm(weight.detach().float()))
    if init == "pissa":  # pissa_factors already ran W's SVD: span(B_0) = span(U_r), no second SVD
        if scaling is None:
            raise ValueError("the PiSSA reference needs the scaling alpha / r")
        b_0, a_0 = (to_work_dtype(x) for x in pissa_factors(weight, rank, scaling))
        u_r = span_basis(b_0)
        return LayerReference(init, b_0, a_0, u_r, u_r, w_norm)
    u_r = top_left_singular_vectors(weight, rank)
    q_r, r_r = olora_factors(weight, rank)
    q_r, r_r = to_work_dtype(q_r), to_work_dtype(r_r)
    if init == "olora":
        return LayerReference(init, q_r, r_r, q_r, u_r, w_norm)
    return LayerReference(init, torch.zeros_like(q_r), None if a_0 is None else to_work_dtype(a_0), q_r, u_r, w_norm)


def align_start_signs(ref: LayerReference, b_t: torch.Tensor, a_t: torch.Tensor) -> tuple[LayerReference, int]:
    """Flip (B_0 column j, A_0 row j) pairs to match the trained adapter; returns the flip count.

    QR fixes Q only up to column signs and B_0 A_0 is the same either way. A start recomputed on
    another device may differ from the one training used by such flips, which would make
    ``b_rel_change``/``a_rel_change`` meaningless (an SVD's singular vectors, PiSSA's start, likewise).
    The pair is flipped when the trained (B, A) lies
    closer to the flipped start; the span, the update and the other metrics do not depend on it.
    """
    if ref.a_0 is None:
        return ref, 0
    agree = (to_work_dtype(b_t) * ref.b_0).sum(0) + (to_work_dtype(a_t) * ref.a_0).sum(1)
    signs = torch.where(agree < 0, -1.0, 1.0).to(WORK_DTYPE)
    flips = int((signs < 0).sum())
    if not flips:
        return ref, 0
    b_0, a_0 = ref.b_0 * signs, ref.a_0 * signs[:, None]
    return LayerReference(ref.init, b_0, a_0, ref.q_r, ref.u_r, ref.w_norm), flips


def finite_or_none(x: float) -> float | None:
    return None if x is None or math.isnan(x) else float(x)


def layer_metrics(ref: LayerReference, b_t: torch.Tensor, a_t: torch.Tensor, scaling: float) -> dict:
    """Every per-layer metric of the module docstring for trained factors (b_t: out x r, a_t: r x in)."""
    b_t, a_t = to_work_dtype(b_t), to_work_dtype(a_t)
    if b_t.shape != ref.b_0.shape or a_t.shape[0] != b_t.shape[1]:
        raise UserError(
            f"adapter factors {tuple(b_t.shape)} / {tuple(a_t.shape)} do not fit a weight of "
            f"shape ({ref.b_0.shape[0]}, ...) at rank {ref.b_0.shape[1]}; wrong base model or rank?"
        )
    out, rank = b_t.shape
    update = low_rank_update(b_t, a_t, ref.b_0, ref.a_0, scaling)
    sigma = update.singular_values()
    if ref.init == "lora":  # B_0 = 0: how far B got, on the scale of OLoRA's start ||Q_r||_F = sqrt(r)
        b_change = float(torch.linalg.norm(b_t)) / math.sqrt(rank)
    else:
        b_change = rel_change(b_t, ref.b_0)
    drift = finite_or_none(subspace_drift(b_t, ref.q_r))
    vs_random, per_dim = normalised_drift(drift, out, rank)
    return {
        "b_subspace_drift": drift,
        "b_subspace_drift_random_baseline": random_drift_baseline(out, rank),
        "b_subspace_drift_vs_random": vs_random,
        "b_subspace_drift_per_dim": per_dim,
        "b_rel_change": finite_or_none(b_change),
        "a_rel_change": None if ref.a_0 is None else finite_or_none(rel_change(a_t, ref.a_0)),
        "b_orthonormality_error": None if ref.init == "pissa" else orthonormality_error(b_t),
        "update_singular_values": [float(s) for s in sigma[:N_SINGULAR_VALUES]],
        "update_effective_rank": effective_rank(sigma),
        "update_in_top_subspace": finite_or_none(update_in_top_subspace(update, ref.u_r)),
        "start_in_top_subspace": finite_or_none(start_in_top_subspace(ref.q_r, ref.u_r)),
        "update_rel_norm": update.norm() / ref.w_norm if ref.w_norm > 0 else None,
    }


def _mean(values: list) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def aggregate(layers: dict[str, dict]) -> dict:
    """Means of the scalar metrics over all layers, and per layer type (``by_layer_type``)."""

    def means(rows: list[dict]) -> dict:
        return {"n_layers": len(rows), **{k: _mean([r.get(k) for r in rows]) for k in SCALAR_METRICS}}

    rows = list(layers.values())
    types = sorted({r["layer_type"] for r in rows})
    result = means(rows)
    result["start_sign_flips"] = sum(r.get("start_sign_flips", 0) for r in rows)
    result["by_layer_type"] = {t: means([r for r in rows if r["layer_type"] == t]) for t in types}
    return result


def _natural_key(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def adapter_factors(adapter_state: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{layer name: (B, A)} from a PEFT adapter state dict, in natural order (layers.2 before layers.10).

    Keys may carry PEFT's ``base_model.model.`` prefix and an adapter name (``lora_A.default``);
    the layer name is what is left, e.g. ``model.layers.0.self_attn.q_proj``.
    """
    found: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in adapter_state.items():
        match = _KEY.match(key)
        if match:
            found.setdefault(match["layer"], {})[match["ab"]] = value
    incomplete = [name for name, ab in found.items() if set(ab) != {"A", "B"}]
    if incomplete:
        raise UserError(f"adapter has lora_A without lora_B (or the reverse) for: {', '.join(incomplete[:3])}")
    if not found:
        raise UserError("adapter holds no lora_A/lora_B weights")
    return {name: (found[name]["B"], found[name]["A"]) for name in sorted(found, key=_natural_key)}


def analyze_adapter(
    base_weights: dict[str, torch.Tensor],
    adapter_state: dict[str, torch.Tensor],
    rank: int,
    alpha: float,
    init: str,
    references: dict | None = None,
) -> dict:
    """Metrics of a trained adapter against the ORIGINAL base weights (see the module docstring).

    ``references``: a dict shared by calls on the same base weights, which keeps each layer's
    reference (a QR and an SVD of W) for the next adapter instead of recomputing it.

    ``base_weights`` maps layer names (``model.layers.0.self_attn.q_proj``, with or without
    ``base_model.model.``) to the weight W before any adapter was added. Returns
    ``{"init", "reference", "aggregate", "layers": {name: {...}}}``.
    """
    check_positive("rank", rank, integer=True)
    check_positive("alpha", alpha)
    if init not in REFERENCES:
        raise UserError(f"init must be one of {', '.join(REFERENCES)}, got '{init}'")
    weights = {_KEY_PREFIX.sub("", k): w for k, w in base_weights.items()}
    factors = adapter_factors(adapter_state)
    missing = [name for name in factors if name not in weights]
    if missing:
        raise UserError(f"adapter layer '{missing[0]}' has no base weight; was it trained on another model?")
    layers = {}
    for name in sorted(factors, key=list(weights).index):  # the order of base_weights (model order)
        b_t, a_t = factors[name]
        weight = weights[name]
        if tuple(weight.shape) != (b_t.shape[0], a_t.shape[1]) or b_t.shape[1] != rank:
            raise UserError(
                f"adapter layer '{name}' (B {tuple(b_t.shape)}, A {tuple(a_t.shape)}) does not fit the base "
                f"weight {tuple(weight.shape)} at rank {rank}; wrong base model or rank?"
            )
        key = (name, rank, init, alpha / rank if init == "pissa" else None)
        ref = references.get(key) if references is not None else None
        if ref is None:
            ref = layer_reference(weight, rank, init, scaling=alpha / rank)
            if references is not None:
                references[key] = ref
        ref, flips = align_start_signs(ref, b_t, a_t)
        layers[name] = {"layer_type": layer_type(name), **layer_metrics(ref, b_t, a_t, alpha / rank),
                        "start_sign_flips": flips}
    return {"init": init, "reference": REFERENCES[init], "aggregate": aggregate(layers), "layers": layers}


@dataclass
class RunInfo:
    """What analysis needs to know about one training run folder."""

    run: str
    model: str
    method: str | None
    ratio: float
    seed: int | None
    init: str
    rank: int
    alpha: float
    adapter_dir: Path


def read_run(run_dir: str | Path) -> RunInfo:
    """Read ``results.json`` and ``adapter/adapter_config.json`` of an ``oloraplus train`` folder."""
    run = Path(run_dir)
    results_file, adapter_dir = run / "results.json", run / "adapter"
    if not run.is_dir():
        raise UserError(f"run folder {run} does not exist")
    if not results_file.is_file():
        raise UserError(f"{run} has no results.json; pass a finished 'oloraplus train' --output folder")
    if not (adapter_dir / "adapter_config.json").is_file():
        raise UserError(f"{run} has no adapter/adapter_config.json; pass a finished 'oloraplus train' --output folder")
    try:
        results = json.loads(results_file.read_text(encoding="utf-8"))
        adapter_config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserError(f"{run}: unreadable JSON ({exc.msg}); is the run complete?") from exc
    config, method = results.get("config") or {}, results.get("method") or {}
    if "model" not in config:
        raise UserError(f"{results_file} has no config.model; is it from 'oloraplus train'?")
    init = method.get("init") or init_for_peft_value(adapter_config.get("init_lora_weights", True))
    if init not in REFERENCES:  # a start analyze cannot rebuild from W
        raise UserError(f"{run} was trained with init {init!r}; analyze supports {', '.join(REFERENCES)} adapters")
    return RunInfo(
        run=str(run),
        model=config["model"],
        method=method.get("name", config.get("method")),
        ratio=float(method.get("ratio", config.get("ratio") or 1.0)),
        seed=config.get("seed"),
        init=init,
        rank=int(adapter_config.get("r", config.get("rank"))),
        alpha=float(adapter_config.get("lora_alpha", config.get("alpha"))),
        adapter_dir=adapter_dir,
    )


def analyze_runs(run_dirs: list[str | Path], output: str | Path, device: str | None = None) -> dict:
    """Analyse finished run folders; write ``OUT/analysis.json`` and plots under ``OUT/plots``.

    Each distinct base model is loaded once, on ``device`` (default: CUDA when available, where
    the SVDs of the full weights are much faster; else the CPU). Returns the
    analysis dict: ``{"runs": [{"run", "model", "method", "ratio", "seed", "init", "rank",
    "alpha", "reference", "aggregate", "layers"}], "plots": [...]}``.
    """
    from oloraplus.models.loading import default_device, load_model

    if not run_dirs:
        raise UserError("give at least one run folder to analyse")
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise UserError(f"--output {out} is an existing file; give a folder path")
    infos = [read_run(d) for d in run_dirs]  # every folder checked before any model is loaded
    entries: list[dict | None] = [None] * len(infos)
    for model_name in dict.fromkeys(info.model for info in infos):
        model, _ = load_model(model_name, device=device or default_device())
        references: dict = {}  # per layer of this base model, shared by its runs
        for i, info in enumerate(infos):
            if info.model != model_name:
                continue
            state = load_adapter_weights(info.adapter_dir)
            weights = _base_weights(model, adapter_factors(state))
            result = analyze_adapter(weights, state, info.rank, info.alpha, info.init, references)
            entries[i] = {
                "run": info.run, "model": info.model, "method": info.method, "ratio": info.ratio,
                "seed": info.seed, "init": info.init, "rank": info.rank, "alpha": info.alpha, **result,
            }
        del model
    analysis = {"runs": entries, "plots": plot_analysis(entries, out)}
    write_json_atomic(out / "analysis.json", analysis, indent=None)  # per-layer numbers: keep it small
    return analysis


def summary_lines(analysis: dict) -> list[str]:
    """One line per run with the headline aggregates (what ``oloraplus analyze`` prints)."""

    def fmt(x) -> str:
        return "    -" if x is None else f"{x:.4f}"

    lines = [f"{'ratio':>8} {'init':5} {'B drift':>8} {'B rel':>8} {'A rel':>8} {'eff.rank':>8}  run"]
    for e in analysis["runs"]:
        a = e["aggregate"]
        lines.append(
            f"{e['ratio']:>8g} {e['init']:5} {fmt(a['b_subspace_drift']):>8} {fmt(a['b_rel_change']):>8} "
            f"{fmt(a['a_rel_change']):>8} {fmt(a['update_effective_rank']):>8}  {e['run']}"
        )
    return lines


def _base_weights(model: torch.nn.Module, factors: dict) -> dict[str, torch.Tensor]:
    """The adapted layers' weights, in the model's module order."""
    modules = {name: m for name, m in model.named_modules() if name in factors}
    missing = [name for name in factors if not isinstance(getattr(modules.get(name), "weight", None), torch.Tensor)]
    if missing:
        raise UserError(f"adapter layer '{missing[0]}' is not in the base model; was it trained on another model?")
    return {name: m.weight for name, m in modules.items()}


def _figure(n_panels: int, width: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, 2.6 * n_panels), layout="constrained")
    FigureCanvasAgg(fig)  # Agg without touching pyplot's global backend
    return fig, fig.subplots(n_panels, 1, squeeze=False, sharex=True)[:, 0]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "run"


def plot_run(entry: dict, path: Path) -> None:
    """Per-layer subspace drift and relative changes of B and A for one run."""
    from matplotlib.patches import Patch

    names = list(entry["layers"])
    rows = list(entry["layers"].values())
    colors = {"attention": "tab:blue", "mlp": "tab:orange", "other": "tab:gray"}
    fig, (ax1, ax2) = _figure(2, max(6.0, 0.12 * len(names) + 2))
    x = list(range(len(names)))
    drift = [r["b_subspace_drift"] if r["b_subspace_drift"] is not None else math.nan for r in rows]
    ax1.bar(x, drift, color=[colors[r["layer_type"]] for r in rows])
    ax1.axhline(rows[0]["b_subspace_drift_random_baseline"], color="k", ls=":", lw=1, label="random subspace")
    ax1.set_ylabel("B subspace drift\n(mean sin² vs span(B_0) or Q_r)")
    handles = [Patch(color=c, label=t) for t, c in colors.items() if any(r["layer_type"] == t for r in rows)]
    ax1.legend(handles=[*handles, *ax1.get_legend_handles_labels()[0]], fontsize=7, loc="upper left")
    for key, style in (("b_rel_change", "-o"), ("a_rel_change", "-s")):
        values = [r[key] if r[key] is not None else math.nan for r in rows]
        ax2.plot(x, values, style, ms=2, lw=1, label=key)
    ax2.set_ylabel("relative change")
    ax2.legend(fontsize=7)
    step = max(1, len(names) // 40)
    ax2.set_xticks(x[::step], [n.replace("model.", "").replace("layers.", "") for n in names][::step],
                   rotation=90, fontsize=5)
    ax1.set_title(f"{entry['run']}  {entry['method']}  ratio={entry['ratio']:g}", fontsize=8)
    fig.savefig(path, dpi=120)


def plot_drift_vs_ratio(entries: list[dict], path: Path) -> None:
    """Aggregate drift and relative changes against log2(ratio), one line per (model, init)."""
    fig, axes = _figure(3, 6.0)
    keys = ("b_subspace_drift", "b_rel_change", "a_rel_change")
    series: dict[tuple, list[dict]] = {}
    for e in entries:
        series.setdefault((e["model"], e["init"]), []).append(e)
    for (model, init), group in series.items():
        label = f"{Path(model).name} ({init})"
        for ax, key in zip(axes, keys):
            points = [(math.log2(e["ratio"]), e["aggregate"][key]) for e in group if e["aggregate"][key] is not None]
            if not points:
                continue
            (line,) = ax.plot([], [])
            ax.scatter(*zip(*points), s=12, alpha=0.6, color=line.get_color())
            by_x: dict[float, list[float]] = {}
            for x, y in points:
                by_x.setdefault(x, []).append(y)
            xs = sorted(by_x)
            ax.plot(xs, [sum(by_x[x]) / len(by_x[x]) for x in xs], "-", color=line.get_color(), label=label)
    for ax, key in zip(axes, keys):
        ax.set_ylabel(key)
        ax.axvline(0.0, color="k", lw=0.5, ls=":")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    axes[-1].set_xlabel("log2(ratio)  (ratio = lr_B / lr_A)")
    fig.savefig(path, dpi=120)


def plot_analysis(entries: list[dict], out: Path) -> list[str]:
    """Write the plots; returns their paths relative to ``out``."""
    plots_dir = out / "plots"
    plots_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for i, entry in enumerate(entries):
        name = f"plots/{i:02d}-{_slug(Path(entry['run']).name)}-drift.png"
        plot_run(entry, out / name)
        written.append(name)
    if len({e["ratio"] for e in entries}) > 1:
        plot_drift_vs_ratio(entries, out / "plots/drift_vs_ratio.png")
        written.append("plots/drift_vs_ratio.png")
    return written
