"""OLoRA+: OLoRA initialisation + LoRA+ optimisation for causal language models."""

from .adapters import OLoRAPlusConfig, apply_olora
from .errors import UserError
from .metrics import compute_text_metrics
from .models import load_model
from .optim import create_optimizer
from .trainer import OLoRAPlusTrainer, OLoRAPlusTrainingArguments

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
