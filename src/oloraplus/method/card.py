"""Model cards (``README.md``) for the adapter folders ``oloraplus train`` writes.

A card has a YAML front matter that the Hugging Face Hub reads (``library_name: peft``,
``base_model``, tags) and then, in plain Markdown: the base model and its weight fingerprint,
the method (init, lambda = lr_B / lr_A, both learning rates), the training data and its sha256,
the evaluation metrics, and how to load the folder.

The "base weight sha256" is :func:`oloraplus.method.identity.model_fingerprint`: a sha256 over
every parameter's name and shape and a fixed sample of its values, not the sha256 of the weight
files (those differ between safetensors shards and formats of the same weights). ``oloraplus
evaluate`` and ``export`` recompute it and refuse a different base.
"""

from __future__ import annotations

import json
from pathlib import Path

from oloraplus.files import write_text_atomic

CARD_FILE = "README.md"

# What the folder holds, and how to load it, by kind.
_KINDS = {
    "adapter": (
        "PEFT adapter as trained (`init_lora_weights={init}`). PEFT re-runs the {init} init on the base "
        "model when it loads this adapter (it changes the base weights in place), so it needs the exact "
        "base weights above; `adapter-lora/` beside it is the same fine-tuned model as a standard LoRA.",
    ),
    "lora": (
        "Standard LoRA adapter (`init_lora_weights=True`, rank 2r): the fine-tuned model's update on the "
        "untouched base model, converted from the {init} adapter (`oloraplus export --to lora`). Any "
        "PEFT-compatible stack loads it on the original base model without re-running an init.",
    ),
}


def model_card(
    kind: str,
    *,
    base_model: str,
    base_fingerprint: str,
    method: str,
    init: str,
    ratio: float,
    lr: float,
    data_source: str,
    data_sha256: str,
    metrics: dict,
    folder_name: str,
) -> str:
    """The text of the card for an ``adapter`` (as trained) or ``lora`` (standard LoRA) folder."""
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {sorted(_KINDS)}, got {kind!r}")
    tags = ["peft", "lora", "oloraplus", method]
    front = "\n".join([
        "---",
        "library_name: peft",
        f"base_model: {json.dumps(base_model)}",
        "tags:",
        *(f"- {json.dumps(tag)}" for tag in tags),
        "---",
    ])
    metric_rows = "\n".join(f"| {name} | {_number(value)} |" for name, value in sorted(metrics.items()))
    metric_text = ("| metric | value |\n|---|---|\n" + metric_rows) if metric_rows else "No evaluation was run."
    return f"""{front}

# {method} adapter for {base_model}

{_KINDS[kind][0].format(init=init)}

## Training

- Base model: `{base_model}`
- Base weight fingerprint (oloraplus `model_fingerprint`, sha256 over names, shapes and sampled values): `{base_fingerprint}`
- Method: `{method}` (init `{init}`, LoRA+ ratio lambda = lr_B / lr_A = {_number(ratio)})
- Learning rates: lr_A = {_number(lr)}, lr_B = {_number(lr * ratio)}
- Data: `{data_source}` (sha256 `{data_sha256}`)

## Metrics

{metric_text}

## How to load

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM

base = AutoModelForCausalLM.from_pretrained({json.dumps(base_model)})
model = PeftModel.from_pretrained(base, "{folder_name}")
```

Or `oloraplus generate --model {base_model} --adapter {folder_name} --prompt "..."`.
"""


def write_model_card(folder: str | Path, kind: str, **fields) -> Path:
    """Write :func:`model_card` as ``folder/README.md`` (replacing PEFT's template card)."""
    path = Path(folder) / CARD_FILE
    write_text_atomic(path, model_card(kind, folder_name=Path(folder).name, **fields))
    return path


def _number(value) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)
