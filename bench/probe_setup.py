"""Shared set-up of the whole-step probes: SmolLM2 (or another registry model) as `oloraplus train` runs it.

OLoRA+ adapters (r = 32, ratio 0.25), frozen weights in bf16, `AddmmLoRA`, the grouped attention kernel,
freed memory kept; 8 length-sorted batches of 8 of the bench's 256-record split (every 32nd record).
"""
from oloraplus.adapters import apply_olora
from oloraplus.attention import GROUPED, use_attention
from oloraplus.bench import BenchConfig, _split_examples
from oloraplus.evaluation import collate
from oloraplus.models import load_model
from oloraplus.runtime import keep_freed_memory, prepare_for_compute
from oloraplus.train import TrainConfig


def training_model_and_batches(name: str = "smollm2-135m"):
    keep_freed_memory("cpu")
    model, tok = load_model(name)
    _, train, _ = _split_examples(BenchConfig(model=name, n_train=256, n_eval=8), tok)
    train.sort(key=lambda e: len(e.input_ids))
    batches = [collate(train[i : i + 8], tok.pad_token_id) for i in range(8, 256, 32)]
    config = TrainConfig(output="unused", model=name, method="olora-plus", ratio=0.25).adapter_config()
    model = apply_olora(model, config)
    prepare_for_compute(model, "bf16", "cpu")
    model.train()
    use_attention(model, GROUPED)
    return model, batches
