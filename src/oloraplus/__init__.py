"""OLoRA+: OLoRA initialisation + LoRA+ optimisation for causal language models.

The public API is imported on first use (PEP 562), so ``import oloraplus`` loads no deep-learning,
plotting or metric library until one of these names is touched.
"""

from __future__ import annotations

import importlib

_API = {
    "OLoRAPlusConfig": "oloraplus.method.adapters",
    "apply_adapters": "oloraplus.method.adapters",
    "apply_olora": "oloraplus.method.adapters",
    "create_optimizer": "oloraplus.method.optim",
    "OLoRAPlusTrainer": "oloraplus.method.trainer",
    "OLoRAPlusTrainingArguments": "oloraplus.method.trainer",
    "load_model": "oloraplus.models.loading",
    "compute_text_metrics": "oloraplus.evaluation.metrics",
    "UserError": "oloraplus.errors",
}
__all__ = sorted(_API)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'oloraplus' has no attribute '{name}'")
    value = getattr(importlib.import_module(_API[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
