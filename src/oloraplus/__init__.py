"""OLoRA+: OLoRA initialisation + LoRA+ optimisation for causal language models."""

from oloraplus.errors import UserError
from oloraplus.evaluation.metrics import compute_text_metrics
from oloraplus.method.adapters import OLoRAPlusConfig, apply_olora
from oloraplus.method.optim import create_optimizer
from oloraplus.method.trainer import OLoRAPlusTrainer, OLoRAPlusTrainingArguments
from oloraplus.models.loading import load_model

__all__ = [
    "OLoRAPlusConfig",
    "OLoRAPlusTrainer",
    "OLoRAPlusTrainingArguments",
    "UserError",
    "apply_olora",
    "compute_text_metrics",
    "create_optimizer",
    "load_model",
]
__version__ = "0.1.0"
