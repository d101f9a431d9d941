"""OLoRA and PiSSA initialisation checked against independent references and against PEFT's own
"olora" and "pissa".

The OLoRA reference for every adapted layer is ``torch.linalg.qr`` of the whole fp32 weight (not
the first-r-columns shortcut ``apply_olora`` uses). QR is unique only up to the signs of Q's
columns / R's rows, so both sides are normalised to a non-negative diagonal of R before
comparing, and the sign-free product B @ A is compared as well. The PiSSA reference is a float64
SVD of the weight, with B = U_r sqrt(S_r / s) and A = sqrt(S_r / s) V_r^T (the paper's factors),
signs fixed the same way.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_model
from peft import LoraConfig, get_peft_model

from oloraplus.errors import UserError
from oloraplus.fast.addmm import AddmmLoRA, use_addmm_lora
from oloraplus.method.adapters import OLoRAPlusConfig, adapter_settings, apply_adapters, apply_olora, lora_layers

FAMILIES = ["llama", "opt", "gemma"]
DTYPES = [torch.float32, torch.bfloat16]
RANK, ALPHA = 8, 16
EXPECTED_TARGETS = {
    "llama": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
    "gemma": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
    "opt": {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"},
}


def reference_qr(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Q[:, :r] and R[:r, :] of the full fp32 QR, signs fixed so that diag(R_r) >= 0."""
    q, r = torch.linalg.qr(weight.detach().float())
    return positive_diagonal(q[:, :rank], r[:rank])


def positive_diagonal(b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip column j of B and row j of A together so that A[j, j] >= 0 (B @ A is unchanged)."""
    signs = torch.sign(torch.diagonal(a[:, : a.shape[0]]))
    signs[signs == 0] = 1
    return b * signs, a * signs[:, None]


def inputs(seed: int = 1) -> torch.Tensor:
    return torch.randint(4, 300, (2, 12), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits.float()


def rel_err(x: torch.Tensor, y: torch.Tensor) -> float:
    return ((x - y).norm() / y.norm()).item()


def assert_unchanged_at_step_0(after, before, reference_fp32, dtype) -> None:
    """The adapted model computes the base model's function: exactly in fp32; in bf16, where the
    residual W - s*BA is rounded to bf16 again, within a few times the error bf16 itself makes
    against the fp32 model, and never more than a few percent."""
    if dtype == torch.float32:
        torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    else:
        bf16_noise = rel_err(before, reference_fp32)
        assert 0 < bf16_noise < 0.05
        assert rel_err(after, before) < max(4 * bf16_noise, 1e-3)
        assert rel_err(after, reference_fp32) < 5 * bf16_noise


def original_weights(model) -> dict[str, torch.Tensor]:
    """Module name -> a copy of its weight, for every Linear, keyed as PEFT will name it."""
    return {
        name: module.weight.detach().clone()
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
    }


def base_and_logits(family: str, dtype):
    """A tiny model, its original weights, inputs, its logits, and the same model's logits in fp32."""
    model = tiny_model(family, dtype=dtype)
    ids = inputs()
    return model, original_weights(model), ids, logits(model, ids), logits(tiny_model(family), ids)  # same seed


def peft_key(name: str) -> str:
    return name.removeprefix("base_model.model.")


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_olora_init_matches_independent_qr(family, dtype):
    model, weights, ids, before, reference_fp32 = base_and_logits(family, dtype)

    peft_model = apply_olora(model, OLoRAPlusConfig(rank=RANK, alpha=ALPHA))
    layers = lora_layers(peft_model)
    assert layers, "no LoRA layers were added"
    scale = ALPHA / RANK
    for name, layer in layers.items():
        w = weights[peft_key(name)]
        q_r, r_r = reference_qr(w, RANK)
        b = layer.lora_B["default"].weight.detach()
        a = layer.lora_A["default"].weight.detach()
        assert b.dtype == a.dtype == torch.float32, "adapter factors must be kept in fp32"
        assert layer.scaling["default"] == pytest.approx(scale)
        b_pos, a_pos = positive_diagonal(b, a)
        torch.testing.assert_close(a_pos, r_r, rtol=1e-4, atol=2e-5, msg=f"{name}: A != R_r")
        torch.testing.assert_close(b_pos, q_r, rtol=1e-4, atol=2e-5, msg=f"{name}: B != Q_r")
        torch.testing.assert_close(b @ a, q_r @ r_r, rtol=1e-4, atol=2e-5)
        torch.testing.assert_close(b.T @ b, torch.eye(RANK), rtol=0, atol=1e-5, msg=f"{name}: B^T B != I")
        # Base weight = W - s * Q_r R_r, rounded once to the model's dtype.
        base = layer.get_base_layer().weight.detach()
        assert base.dtype == dtype
        expected = (w.float() - scale * (q_r @ r_r)).to(dtype).float()
        if dtype == torch.float32:
            torch.testing.assert_close(base.float(), expected, rtol=1e-5, atol=1e-5)
        else:  # one bf16 rounding step at most: fp32 rounding can tip a value across a bf16 boundary
            torch.testing.assert_close(base.float(), expected, rtol=2**-7, atol=1e-4)
        # Everything is still fixed by the factors: W == base + s*B@A (within the dtype's rounding).
        tol = 1e-5 if dtype == torch.float32 else 2**-7
        torch.testing.assert_close(base.float() + scale * (b @ a), w.float(), rtol=tol, atol=tol * w.abs().max().item())

    assert_unchanged_at_step_0(logits(peft_model, ids), before, reference_fp32, dtype)


@pytest.mark.parametrize("init", ["olora", "pissa"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_matches_plain_peft(family, dtype, init):
    """PEFT's own init_lora_weights="olora" (full QR) / "pissa" (full SVD) gives the same product,
    base and outputs."""
    model = tiny_model(family, dtype=dtype)
    ids = inputs(2)
    ours = apply_adapters(copy.deepcopy(model), OLoRAPlusConfig(rank=RANK, alpha=ALPHA, init=init))
    peft_config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=sorted(EXPECTED_TARGETS[family]),
                             init_lora_weights=init, task_type="CAUSAL_LM")
    theirs = get_peft_model(copy.deepcopy(model), peft_config)
    ours_layers, their_layers = lora_layers(ours), lora_layers(theirs)
    assert ours_layers.keys() == their_layers.keys()
    # PEFT stores its factors in the model dtype before upcasting them, so in bf16 its B and A
    # carry one bf16 rounding; ours are exact fp32 factors.
    product_tol = 1e-5 if dtype == torch.float32 else 2**-7
    for name, layer in ours_layers.items():
        other = their_layers[name]
        prod = layer.lora_B["default"].weight @ layer.lora_A["default"].weight
        their_prod = (other.lora_B["default"].weight @ other.lora_A["default"].weight).float()
        torch.testing.assert_close(prod.detach(), their_prod.detach(), rtol=product_tol,
                                   atol=product_tol * their_prod.abs().max().item())
        base, their_base = layer.get_base_layer().weight, other.get_base_layer().weight
        assert base.dtype == their_base.dtype == dtype
        if dtype == torch.float32:
            torch.testing.assert_close(base, their_base, rtol=1e-5, atol=1e-5)
        else:
            torch.testing.assert_close(base.float(), their_base.float(), rtol=2**-7, atol=1e-4)
    ours_out, their_out = logits(ours, ids), logits(theirs, ids)
    if dtype == torch.float32:
        torch.testing.assert_close(ours_out, their_out, rtol=1e-4, atol=1e-4)
    else:
        assert rel_err(ours_out, their_out) < 0.05
    assert ours.peft_config["default"].init_lora_weights == init


def reference_svd(weight: torch.Tensor, rank: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PiSSA's B = U_r sqrt(S_r / s), A = sqrt(S_r / s) V_r^T from a float64 SVD, signs fixed so
    that each column of B has a non-negative sum (B @ A is unchanged)."""
    u, s, vh = torch.linalg.svd(weight.detach().double(), full_matrices=False)
    root = torch.sqrt(s[:rank] / scale)
    return same_signs(u[:, :rank] * root, root[:, None] * vh[:rank])


def same_signs(b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    signs = torch.sign(b.sum(dim=0))
    signs[signs == 0] = 1
    return b * signs, a * signs[:, None]


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_pissa_init_matches_independent_svd(family, dtype):
    model, weights, ids, before, reference_fp32 = base_and_logits(family, dtype)

    peft_model = apply_adapters(model, OLoRAPlusConfig(rank=RANK, alpha=ALPHA, init="pissa"))
    layers = lora_layers(peft_model)
    assert {n.rsplit(".", 1)[-1] for n in layers} == EXPECTED_TARGETS[family]
    scale = ALPHA / RANK
    for name, layer in layers.items():
        w = weights[peft_key(name)]
        b_ref, a_ref = reference_svd(w.float(), RANK, scale)  # the fp32 weight PEFT factorises too
        b = layer.lora_B["default"].weight.detach()
        a = layer.lora_A["default"].weight.detach()
        assert b.dtype == a.dtype == torch.float32, "adapter factors must be kept in fp32"
        b_s, a_s = same_signs(b.double(), a.double())
        # A float32 SVD moves singular vector j by about eps * ||W|| / gap_j (gap_j: the distance
        # to the nearest other singular value), and random weights have neighbours 0.05% apart:
        # each column is held to a tolerance of its own, the sign-free product to 1e-5.
        s_all = torch.linalg.svdvals(w.double())
        gaps = torch.minimum((s_all[:RANK] - s_all[1 : RANK + 1]).abs(),
                             torch.cat([s_all[:1], s_all[: RANK - 1] - s_all[1:RANK]]).abs())
        tol = torch.clamp(1e-6 * s_all[0] / gaps, min=1e-5)
        assert ((b_s - b_ref).abs().amax(dim=0) <= tol).all(), f"{name}: B != U_r sqrt(S_r/s)"
        assert ((a_s - a_ref).abs().amax(dim=1) <= tol).all(), f"{name}: A != sqrt(S_r/s) V_r^T"
        torch.testing.assert_close(b.double() @ a.double(), b_ref @ a_ref, rtol=0, atol=1e-5)
        # s B A is W's best rank-r approximation: the residual holds exactly W's other singular values.
        residual = w.double() - scale * (b.double() @ a.double())
        torch.testing.assert_close(torch.linalg.svdvals(residual)[: len(s_all) - RANK], s_all[RANK:],
                                   rtol=1e-4, atol=1e-4)
        base = layer.get_base_layer().weight.detach()
        assert base.dtype == dtype
        expected = residual.float().to(dtype).float()
        if dtype == torch.float32:
            torch.testing.assert_close(base.float(), expected, rtol=1e-5, atol=1e-5)
        else:
            torch.testing.assert_close(base.float(), expected, rtol=2**-7, atol=1e-4)

    assert_unchanged_at_step_0(logits(peft_model, ids), before, reference_fp32, dtype)
    assert peft_model.peft_config["default"].init_lora_weights == "pissa"


def test_apply_records_its_config_on_the_model():
    config = OLoRAPlusConfig(rank=4, ratio=16, lr=1e-3, weight_decay=0.1)
    model = apply_adapters(tiny_model("llama"), config)
    assert adapter_settings(model) is config
    assert adapter_settings(copy.deepcopy(model)).ratio == 16
    assert adapter_settings(tiny_model("llama")) is None
    assert apply_olora is apply_adapters
    unset = OLoRAPlusConfig()
    assert (unset.lr, unset.ratio, unset.weight_decay) == (None, None, None)  # "not given"


@pytest.mark.parametrize("family", FAMILIES)
def test_default_targets_are_every_attention_and_mlp_linear(family):
    model = tiny_model(family)
    n_layers = model.config.num_hidden_layers
    peft_model = apply_olora(model, OLoRAPlusConfig(rank=4))
    names = list(lora_layers(peft_model))
    assert {n.rsplit(".", 1)[-1] for n in names} == EXPECTED_TARGETS[family]
    assert len(names) == n_layers * len(EXPECTED_TARGETS[family])
    # Nothing else is adapted: the LM head and embeddings stay plain modules.
    assert not any("lm_head" in n or "embed" in n for n in names)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)


def test_lora_init_gives_zero_b_and_unchanged_base():
    model = tiny_model("llama")
    weights = original_weights(model)
    ids = inputs()
    before = logits(model, ids)
    peft_model = apply_olora(model, OLoRAPlusConfig(rank=4, init="lora"))
    for name, layer in lora_layers(peft_model).items():
        assert torch.count_nonzero(layer.lora_B["default"].weight) == 0
        assert torch.count_nonzero(layer.lora_A["default"].weight) > 0
        assert torch.equal(layer.get_base_layer().weight, weights[peft_key(name)])
    torch.testing.assert_close(logits(peft_model, ids), before, rtol=0, atol=0)
    assert peft_model.peft_config["default"].init_lora_weights is True


def test_rank_larger_than_a_layer_names_the_layer():
    model = tiny_model("llama")
    # k_proj/v_proj map 64 -> 32 (2 kv heads of 16), so rank 33 is too large for them only.
    too_small = {
        name for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and min(m.in_features, m.out_features) < 33
        and name.rsplit(".", 1)[-1] in EXPECTED_TARGETS["llama"]
    }
    assert too_small and all(n.endswith(("k_proj", "v_proj")) for n in too_small)
    with pytest.raises(UserError) as info:
        apply_olora(model, OLoRAPlusConfig(rank=33))
    message = str(info.value)
    assert any(f"'{name}'" in message for name in too_small), message
    assert "32" in message  # the largest rank that would work
    # Targets that are all large enough accept the same rank.
    apply_olora(tiny_model("llama"), OLoRAPlusConfig(rank=33, target_modules=["q_proj", "gate_proj"]))


@pytest.mark.parametrize(
    ("targets", "needle"),
    [
        (["no_such_proj"], "no_such_proj"),
        (["q_proj", "wq"], "wq"),
        (["embed_tokens"], "embed_tokens"),
        (["input_layernorm"], "input_layernorm"),
    ],
)
def test_bad_targets_are_user_errors(targets, needle):
    with pytest.raises(UserError, match=needle):
        apply_olora(tiny_model("llama"), OLoRAPlusConfig(rank=4, target_modules=targets))


@pytest.mark.parametrize("kwargs", [{"rank": 0}, {"rank": -1}, {"alpha": 0}, {"ratio": 0},
                                    {"ratio": float("nan")}, {"lr": float("inf")}, {"init": "loftq"},
                                    {"dropout": 1.0}, {"weight_decay": -0.1}, {"lr": 0}])
def test_config_rejects_bad_values(kwargs):
    with pytest.raises(UserError):
        OLoRAPlusConfig(**kwargs)


def trained_like(model, seed: int = 3):
    """Move every A and B off their starting point, so that the LoRA update is not trivial."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_addmm_lora_computes_what_peft_computes(family):
    """Same outputs, same gradients for A and B, same merged weights as PEFT's vanilla LoRA."""
    vanilla = trained_like(apply_olora(tiny_model(family), OLoRAPlusConfig(rank=RANK, alpha=ALPHA)))
    fused = copy.deepcopy(vanilla)
    assert use_addmm_lora(fused) == len(lora_layers(fused))
    assert all(isinstance(m.lora_variant["default"], AddmmLoRA) for m in lora_layers(fused).values())
    ids = inputs(4)
    grads = {}
    for key, model in (("vanilla", vanilla), ("fused", fused)):
        out = model(input_ids=ids).logits
        (out.float() ** 2).mean().backward()
        grads[key] = (out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    torch.testing.assert_close(grads["fused"][0], grads["vanilla"][0], rtol=1e-5, atol=1e-5)
    assert grads["fused"][1].keys() == grads["vanilla"][1].keys() and grads["vanilla"][1]
    for name, g in grads["vanilla"][1].items():
        torch.testing.assert_close(grads["fused"][1][name], g, rtol=1e-4, atol=1e-6)
    merged = {k: m.merge_and_unload().state_dict() for k, m in (("vanilla", vanilla), ("fused", fused))}
    for name, w in merged["vanilla"].items():
        torch.testing.assert_close(merged["fused"][name], w, rtol=1e-6, atol=1e-6)


def test_addmm_lora_with_a_bf16_base():
    """bf16 base weights, fp32 adapters. Without autocast the dtypes differ and PEFT's own sum runs
    (identical output); under autocast the fused sum is as close to the fp32 function as PEFT's."""
    vanilla = trained_like(apply_olora(tiny_model("llama", dtype=torch.bfloat16), OLoRAPlusConfig(rank=RANK, alpha=ALPHA)))
    fused = copy.deepcopy(vanilla)
    use_addmm_lora(fused)
    reference = logits(copy.deepcopy(vanilla).float(), inputs(5))  # the same weights, computed in fp32
    assert torch.equal(logits(fused, inputs(5)), logits(vanilla, inputs(5)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        errors = [rel_err(logits(m, inputs(5)), reference) for m in (vanilla, fused)]
    assert errors[1] < 1.5 * errors[0] + 1e-3, errors


def test_addmm_lora_leaves_other_variants_alone():
    model = apply_olora(tiny_model("llama"), OLoRAPlusConfig(rank=RANK, alpha=ALPHA))
    layers = list(lora_layers(model).values())
    other = object()
    layers[0].lora_variant["default"] = other
    assert use_addmm_lora(model) == len(layers) - 1
    assert layers[0].lora_variant["default"] is other
