"""What an adapter claims about itself, checked: the base model it was trained on and its config.

An OLoRA adapter is only meaningful on the exact base weights it was initialised from (PEFT re-runs
the QR of those weights when it loads it), and an ``adapter_config.json`` whose init, targets or
rank were edited loads without complaint and computes something else. So ``oloraplus train``
writes ``adapter/oloraplus.json`` beside ``adapter_config.json`` with

* ``base_fingerprint``: :func:`model_fingerprint` of the base model as loaded, before the OLoRA
  init changed any weight;
* ``adapter_config``: the init-relevant fields of the saved ``adapter_config.json``;

and ``evaluate`` / ``export`` recompute both and refuse a mismatch (:func:`check_adapter_identity`).
Adapters written by other tools have no ``oloraplus.json``: they are accepted with a warning.

Also here: :func:`check_untied_targets`, which refuses to adapt a layer whose weight is shared
with another (``lm_head`` of a model with tied embeddings): the OLoRA init rewrites the base weight,
which would silently change the tied embedding too, and merging would do the same.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from oloraplus.errors import UserError, warn
from oloraplus.files import write_json_atomic

IDENTITY_FILE = "oloraplus.json"

FINGERPRINT_VERSION = 1

# Elements sampled from each tensor, in _BLOCKS contiguous blocks; the names and shapes are hashed in full.
_SAMPLES_PER_TENSOR = 65536
_BLOCKS = 16

# adapter_config.json fields that change what the adapter computes on its base.
IDENTITY_FIELDS = ("init_lora_weights", "target_modules", "exclude_modules", "r", "lora_alpha", "use_rslora",
                   "rank_pattern", "alpha_pattern", "use_dora", "modules_to_save", "layers_to_transform",
                   "layers_pattern", "fan_in_fan_out", "bias", "lora_bias", "peft_type")


@torch.no_grad()
def model_fingerprint(model: torch.nn.Module) -> str:
    """A fast deterministic fingerprint of a model's weights: sha256 over every parameter's
    name and shape, and (as float32) up to 65536 elements of each tensor, in 16 blocks spread over it.

    Call it on the base model as loaded, before any adapter init changes its weights. A tied weight
    counts once, under its first name. The same checkpoint gives the same value on any device.
    """
    h = hashlib.sha256(f"oloraplus-fingerprint-v{FINGERPRINT_VERSION}".encode())
    seen: set[int] = set()
    for name, tensor in sorted(model.named_parameters(), key=lambda item: item[0]):
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        flat = tensor.detach().reshape(-1)
        h.update(f"{name}|{tuple(tensor.shape)}|{flat.numel()}\n".encode())
        for block in _sample_blocks(flat):
            h.update(block.to(device="cpu", dtype=torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def _sample_blocks(flat: torch.Tensor) -> list[torch.Tensor]:
    """The whole tensor if small, else 16 contiguous blocks spread evenly over it (contiguous reads
    are ~20x faster than a strided gather of the same number of elements)."""
    n = flat.numel()
    if n <= _SAMPLES_PER_TENSOR:
        return [flat]
    size = _SAMPLES_PER_TENSOR // _BLOCKS
    return [flat.narrow(0, (n - size) * i // (_BLOCKS - 1), size) for i in range(_BLOCKS)]


def _normalise(value):
    if isinstance(value, (list, tuple, set)):
        items = [_normalise(v) for v in value]
        return sorted(items, key=lambda v: json.dumps(v, sort_keys=True))
    if isinstance(value, dict):
        return {str(k): _normalise(v) for k, v in sorted(value.items())}
    return value


def identity_fields(adapter_config: dict) -> dict:
    """The init-relevant fields of an ``adapter_config.json`` (lists sorted: their order is irrelevant)."""
    return {k: _normalise(adapter_config.get(k)) for k in IDENTITY_FIELDS}


def _read_adapter_config(adapter_dir: Path) -> dict:
    path = adapter_dir / "adapter_config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from exc
    if not isinstance(config, dict):
        raise UserError(f"{path} is not a JSON object")
    return config


def write_adapter_identity(adapter_dir: str | Path, base_fingerprint: str, base_model: str,
                           prompt_format: str | None = None) -> Path:
    """Write ``oloraplus.json`` beside a saved adapter's ``adapter_config.json``; ``prompt_format``
    (the training data's format: ``alpaca``, ``prompt-completion``, ``chat``) tells ``generate`` how
    to format prompts by default."""
    adapter_dir = Path(adapter_dir)
    record = {
        "format": FINGERPRINT_VERSION,
        "base_model": base_model,
        "base_fingerprint": base_fingerprint,
        "adapter_config": identity_fields(_read_adapter_config(adapter_dir)),
    }
    if prompt_format is not None:
        record["prompt_format"] = prompt_format
    write_json_atomic(adapter_dir / IDENTITY_FILE, record)
    return adapter_dir / IDENTITY_FILE


def adapter_prompt_format(adapter_dir: str | Path) -> str | None:
    """The training data's format recorded in ``oloraplus.json``, or None (another tool's adapter,
    or one written before the format was recorded)."""
    try:
        record = json.loads((Path(adapter_dir) / IDENTITY_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    value = record.get("prompt_format") if isinstance(record, dict) else None
    return value if isinstance(value, str) else None


def check_adapter_identity(adapter_dir: str | Path, base: torch.nn.Module, model_name: str) -> bool:
    """Refuse an adapter whose config was edited or that was trained on another base model.

    ``base`` is the base model as loaded (no adapter applied yet). Returns False (after a warning)
    for an adapter without ``oloraplus.json`` (written by another tool), True when it checked out.
    """
    adapter_dir = Path(adapter_dir)
    path = adapter_dir / IDENTITY_FILE
    if not path.exists():
        warn(f"{adapter_dir} has no {IDENTITY_FILE} (not written by 'oloraplus train'): "
             "its base model and config cannot be checked")
        return False
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        stored_fields, stored_print = record["adapter_config"], record["base_fingerprint"]
        if not isinstance(stored_fields, dict) or not isinstance(stored_print, str):
            raise TypeError("wrong types")
    except (OSError, ValueError, RecursionError, KeyError, TypeError) as exc:
        raise UserError(f"{path} is damaged ({exc}); restore it, or delete it to skip the check") from exc
    now = identity_fields(_read_adapter_config(adapter_dir))
    edited = [k for k in IDENTITY_FIELDS if k in stored_fields and stored_fields[k] != now[k]]
    if edited:
        detail = ", ".join(f"{k} {stored_fields[k]!r} at training, {now[k]!r} now" for k in edited)
        raise UserError(f"{adapter_dir / 'adapter_config.json'} was edited after training ({detail}); "
                        "restore the original")
    if model_fingerprint(base) != stored_print:
        trained_on = record.get("base_model")
        raise UserError(
            f"adapter {adapter_dir} was trained on a different base model"
            + (f" ({trained_on})" if trained_on else "")
            + f" than '{model_name}' (weight fingerprints differ); pass the model it was trained on"
        )
    return True


def check_untied_targets(model: torch.nn.Module, targets: list[str] | str) -> None:
    """Refuse to adapt a layer whose weight is shared with another module (tied embeddings).

    ``targets`` as ``LoraConfig.target_modules`` takes them: module names matched by their last
    components, or ``"all-linear"`` (which PEFT never applies to the output layer).
    """
    if isinstance(targets, str):
        return
    module_names = [name for name, _ in model.named_modules()
                    if any(name == t or name.endswith("." + t) for t in targets)]
    owners: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(name)
    for module_name in module_names:
        module = model.get_submodule(module_name)
        if hasattr(module, "get_base_layer"):  # a PEFT LoRA layer: its weight is the base layer's
            module = module.get_base_layer()
        weight = getattr(module, "weight", None)
        if weight is None:
            continue
        others = [n for n in owners.get(id(weight), []) if not n.startswith(module_name + ".")]
        if others:
            raise UserError(
                f"target module '{module_name}' shares its weight with '{others[0].removesuffix('.weight')}' "
                "(tied embeddings): adapting it would change both; leave it out of --target-modules"
            )
