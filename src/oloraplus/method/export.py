"""``oloraplus export``: hand a trained OLoRA (or PiSSA) adapter to tools that expect plain LoRA.

OLoRA starts from B_0 = Q_r, A_0 = R_r and changes the base weight to W - s*B_0*A_0. A saved
OLoRA adapter therefore only works on a base that PEFT first mutates the same way (it re-runs
the init when it loads an adapter whose config says ``init_lora_weights="olora"``), and two
such adapters cannot share one base. The fine-tuned weight is

    W + s * (B_T A_T - B_0 A_0)

so the update is a rank-2r LoRA on the *untouched* W: A' = [A_T; A_0], B' = [B_T, -B_0] with
the same scale s (r' = 2r, alpha' = 2 alpha; alpha' = sqrt(2) alpha under rsLoRA). This is the
conversion PEFT's ``save_pretrained(path_initial_model_for_weight_conversion=...)`` performs,
but without having to save the initial adapter before training: B_0 and A_0 are recomputed
from the original base weight with the init's factor function in
:data:`oloraplus.method.adapters.INITS`, the very function training used. PiSSA adapters
(``init_lora_weights="pissa"``, start W's top-r SVD) convert the same way.

``--to lora`` writes that adapter (``init_lora_weights=True`` in its config, so any loader
leaves the base alone); ``--to merged`` adds the update into the weights and writes a full
float32 checkpoint plus the tokenizer, loadable with ``from_pretrained``. An adapter trained
with the standard LoRA init (B_0 = 0) needs no conversion: ``lora`` copies it.

Either output is written into a temporary sibling folder and renamed into place at the end, so
an interrupted export never leaves a folder that looks finished.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import torch

from oloraplus.errors import UserError
from oloraplus.method.adapters import INITS, init_for_peft_value, load_adapter_weights
from oloraplus.method.identity import check_adapter_identity
from oloraplus.outputs import MODEL_MARKERS, claimed, commit_output, open_output, staging_folder

EXPORT_TARGETS = ("lora", "merged")

_PEFT_PREFIX = "base_model.model."


def export_adapter(model: str, adapter: str, to: str, output: str, overwrite: bool = False) -> Path:
    """Export ``adapter`` (trained on ``model``) as a standard LoRA adapter or a merged model.

    Returns the output folder. Raises :class:`UserError` for a missing or unsupported adapter,
    an adapter that does not fit the model, or an output folder that is in the way.
    """
    from peft import LoraConfig

    from oloraplus.models.loading import load_model

    if to not in EXPORT_TARGETS:
        raise UserError(f"--to must be one of {', '.join(EXPORT_TARGETS)}, got '{to}'")
    adapter_dir = Path(adapter)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise UserError(f"{adapter_dir} is not a PEFT adapter folder (no adapter_config.json); pass RUN/adapter")
    out = _check_output(Path(output), overwrite, sources=[adapter_dir, Path(model)])
    try:
        config = LoraConfig.from_pretrained(str(adapter_dir))
    except Exception as exc:  # wrong peft_type, unreadable JSON, unknown keys
        raise UserError(f"cannot read {adapter_dir / 'adapter_config.json'} as a LoRA config: {exc}") from exc
    init_name = init_for_peft_value(config.init_lora_weights)
    if init_name is None:
        handled = ", ".join(repr(i.peft_value) for i in INITS.values() if i.factors)
        raise UserError(f"adapter {adapter_dir} uses init_lora_weights={config.init_lora_weights!r}; "
                        f"export handles {handled} and standard LoRA inits")
    converts = INITS[init_name].factors is not None  # the base was changed: rebuild B_0, A_0
    if config.use_dora:
        raise UserError(f"adapter {adapter_dir} is a DoRA adapter; export handles plain LoRA only")

    base, tokenizer = load_model(model)  # float32, untouched
    check_adapter_identity(adapter_dir, base, model)  # trained on this base, config not edited
    if converts:
        weights, config = to_standard_lora(base, load_adapter_weights(adapter_dir), config, where=str(adapter_dir))
    else:
        weights = load_adapter_weights(adapter_dir)

    with _staged(out, overwrite) as tmp:
        if to == "lora":
            if converts:
                _save_adapter(tmp, weights, config)
            else:
                shutil.copytree(adapter_dir, tmp, dirs_exist_ok=True)
        else:
            merged = merge_lora(base, weights, config)
            merged.config.use_cache = True  # load_model turned the KV cache off for training
            merged.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    return out


@torch.no_grad()
def to_standard_lora(
    base: torch.nn.Module, weights: dict[str, torch.Tensor], config, where: str = "adapter"
) -> tuple[dict[str, torch.Tensor], object]:
    """Turn a trained OLoRA or PiSSA adapter's weights into a rank-2r LoRA for the untouched ``base``.

    ``weights`` are the adapter's saved tensors (PEFT names, without the adapter name);
    ``base`` must hold the ORIGINAL weights (not the residual the init left). The start B_0, A_0
    is rebuilt with the factor function of ``config.init_lora_weights`` in ``INITS``. Returns the
    new tensors (float32) and a copy of ``config`` with r, alpha and the init changed to match.
    """
    _check_convertible(config, where)
    init_name = init_for_peft_value(config.init_lora_weights)
    factors = INITS[init_name].factors if init_name else None
    if factors is None:
        raise UserError(f"{where}: init_lora_weights={config.init_lora_weights!r} has no start to convert")
    scale = config.lora_alpha / (config.r**0.5 if config.use_rslora else config.r)  # PEFT's scaling
    start: dict[str, torch.Tensor] = {}
    for key, a_t in weights.items():
        if not key.endswith(".lora_A.weight"):
            continue
        prefix = key[: -len(".lora_A.weight")]
        b_t = weights.get(prefix + ".lora_B.weight")
        module = _base_linear(base, prefix, where)
        if b_t is None or a_t.shape[1] != module.in_features or b_t.shape[0] != module.out_features:
            raise UserError(f"{where} does not fit this model: layer {_module_path(prefix)} has another shape")
        b_0, a_0 = factors(module.weight, a_t.shape[0], scale)
        start[key], start[prefix + ".lora_B.weight"] = a_0, b_0
    return lora_from_start(weights, start, config, where)


@torch.no_grad()
def lora_from_start(
    weights: dict[str, torch.Tensor], start: dict[str, torch.Tensor], config, where: str = "adapter"
) -> tuple[dict[str, torch.Tensor], object]:
    """The rank-2r standard LoRA A' = [A_T; A_0], B' = [B_T, -B_0] from the trained factors
    ``weights`` and the start factors ``start`` (same PEFT names, e.g. from :func:`start_factors`).

    Needs no base model: training keeps the start it applied, so this is exact (up to float32
    rounding) without recomputing the QR or SVD. Returns the new tensors and config as
    :func:`to_standard_lora` does.
    """
    import copy

    _check_convertible(config, where)
    converted = dict(weights)
    for key, a_t in weights.items():
        if not key.endswith(".lora_A.weight"):
            continue
        b_key = key[: -len(".lora_A.weight")] + ".lora_B.weight"
        if b_key not in weights or key not in start or b_key not in start:
            raise UserError(f"{where}: no start factors for layer {_module_path(key[: -len('.lora_A.weight')])}")
        converted[key] = torch.cat([a_t.float(), start[key].float().cpu()], dim=0)
        converted[b_key] = torch.cat([weights[b_key].float(), -start[b_key].float().cpu()], dim=1)
    new = copy.deepcopy(config)
    new.init_lora_weights = True
    new.r = 2 * config.r
    new.lora_alpha = config.lora_alpha * (2**0.5 if config.use_rslora else 2)  # same scale s
    return converted, new


@torch.no_grad()
def start_factors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A float32 CPU copy of a PEFT model's LoRA factors under their saved names: call it right after
    the init, before training, to keep the start B_0, A_0 for :func:`write_standard_lora`."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().float().cpu().clone() for k, v in get_peft_model_state_dict(model).items()
            if ".lora_A." in k or ".lora_B." in k}


def write_standard_lora(adapter_dir: str | Path, dest: str | Path, start: dict[str, torch.Tensor]) -> Path:
    """Write the saved adapter ``adapter_dir`` as a standard LoRA adapter into the folder ``dest`` (replaced).

    An OLoRA or PiSSA adapter is converted with its start factors ``start`` (:func:`start_factors`
    taken before training) by :func:`lora_from_start`; an adapter with a standard init is copied.
    ``dest`` must lie inside an output that is being staged (``oloraplus train`` writes
    ``RUN/adapter-lora`` into its staged run folder).
    """
    from peft import LoraConfig

    adapter_dir, dest = Path(adapter_dir), Path(dest)
    config = LoraConfig.from_pretrained(str(adapter_dir))
    # A resumed run may find the one its killed predecessor wrote: replaced, as adapter/ is.
    shutil.rmtree(dest, ignore_errors=True)
    init_name = init_for_peft_value(config.init_lora_weights)
    if init_name is None or INITS[init_name].factors is None:  # B_0 = 0: already standard
        shutil.copytree(adapter_dir, dest)
        return dest
    weights, new = lora_from_start(load_adapter_weights(adapter_dir), start, config, where=str(adapter_dir))
    dest.mkdir(parents=True)
    _save_adapter(dest, weights, new)
    return dest


def _check_convertible(config, where: str) -> None:
    if config.rank_pattern or config.alpha_pattern:
        raise UserError(f"{where}: rank_pattern/alpha_pattern adapters are not supported by export")


def merge_lora(base: torch.nn.Module, weights: dict[str, torch.Tensor], config) -> torch.nn.Module:
    """``base`` with a standard (B_0 = 0 at init, base untouched) LoRA adapter merged in."""
    import copy

    from peft import get_peft_model, set_peft_model_state_dict

    config = copy.deepcopy(config)
    config.inference_mode = False
    peft_model = get_peft_model(base, config)
    result = set_peft_model_state_dict(peft_model, weights)
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing or result.unexpected_keys:
        raise UserError(
            f"the adapter does not fit this model: {len(missing)} LoRA weights missing, "
            f"{len(result.unexpected_keys)} unexpected"
        )
    return peft_model.merge_and_unload()


def _module_path(prefix: str) -> str:
    return prefix[len(_PEFT_PREFIX):] if prefix.startswith(_PEFT_PREFIX) else prefix


def _base_linear(base: torch.nn.Module, prefix: str, where: str) -> torch.nn.Linear:
    path = _module_path(prefix)
    try:
        module = base.get_submodule(path)
    except AttributeError:
        raise UserError(f"{where} does not fit this model: it has no layer {path}") from None
    if not isinstance(module, torch.nn.Linear):
        raise UserError(f"{where}: layer {path} is a {type(module).__name__}; export handles Linear layers")
    return module


def _save_adapter(folder: Path, weights: dict[str, torch.Tensor], config) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in weights.items()}, str(folder / "adapter_model.safetensors"),
              metadata={"format": "pt"})
    config.inference_mode = True
    config.save_pretrained(str(folder))


def _check_output(out: Path, overwrite: bool, sources: list[Path]) -> Path:
    """Check and claim the output before anything is loaded (see :mod:`oloraplus.outputs`): refuse
    a file, a non-empty folder without overwrite (or one that holds no earlier export), an output
    that is, holds or lies above an input, the working folder or a cache, or one being written by
    another process. Nothing is changed until :func:`_staged` swaps the finished export in."""
    open_output(out, overwrite, inputs=sources, markers=MODEL_MARKERS, stage=True)
    return out


@contextlib.contextmanager
def _staged(out: Path, overwrite: bool):
    """Yield the staging folder beside ``out`` (claimed by :func:`_check_output`); on success it
    replaces ``out`` in one step, on failure it is removed and ``out`` stays as it was."""
    with claimed(out):
        yield staging_folder(out)
        commit_output(out)
