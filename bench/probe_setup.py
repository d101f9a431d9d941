"""Shared set-up of the whole-step probes: a registry model as `oloraplus train` runs it, and one step.

OLoRA+ adapters (r = 32, ratio 0.25), frozen weights in bf16, `AddmmLoRA`, the grouped attention kernel,
freed memory kept. Batches of 8 real Alpaca records: without lengths, 8 length-sorted batches of the
bench's 256-record split (every 32nd record); with lengths, for each the 8 records of the first 3000
nearest below that length.
"""
from bench.harness import BenchConfig, split_examples
from oloraplus.data.batching import collate
from oloraplus.data.records import DEFAULT_DATA, load_records
from oloraplus.data.tokenize import tokenize_records
from oloraplus.fast.attention import GROUPED, use_attention
from oloraplus.fast.memory import keep_freed_memory
from oloraplus.fast.precision import prepare_for_compute
from oloraplus.method.adapters import apply_olora
from oloraplus.method.loss import response_loss
from oloraplus.models.loading import load_model
from oloraplus.training.config import TrainConfig
from oloraplus.training.runtime import autocast


def training_model_and_batches(name: str = "smollm2-135m", lengths: list[int] | None = None,
                               with_tokenizer: bool = False):
    """``(model, batches)``, or ``(model, batches, tokenizer)`` with ``with_tokenizer``."""
    keep_freed_memory("cpu")
    model, tok = load_model(name)
    if lengths:
        examples, _ = tokenize_records(load_records(DEFAULT_DATA).records[:3000], tok, 512)
        examples.sort(key=lambda e: len(e.input_ids))
        batches = []
        for length in lengths:
            i = min(range(len(examples)), key=lambda j: abs(len(examples[j].input_ids) - length))
            batches.append(collate(examples[max(0, i - 8) : max(8, i)], tok.pad_token_id))
    else:
        _, train, _ = split_examples(BenchConfig(model=name, n_train=256, n_eval=8), tok)
        train.sort(key=lambda e: len(e.input_ids))
        batches = [collate(train[i : i + 8], tok.pad_token_id) for i in range(8, 256, 32)]
    config = TrainConfig(output="unused", model=name, method="olora-plus", ratio=0.25).adapter_config()
    model = apply_olora(model, config)
    prepare_for_compute(model, "bf16", "cpu")
    model.train()
    use_attention(model, GROUPED)
    return (model, batches, tok) if with_tokenizer else (model, batches)


def forward_backward(model, batch) -> float:
    """One training step's forward and backward (bf16 autocast, loss on the responses); returns the loss.

    The gradients stay in the parameters: the caller reads or clears them.
    """
    with autocast("bf16", "cpu"):
        loss = response_loss(model, **batch)
    loss.backward()
    return loss.item()
