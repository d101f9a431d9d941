"""Shared fixtures: tiny random models (Llama, OPT, Gemma), a tokenizer, and Alpaca-shaped data.

Nothing here touches the network or the real Alpaca file: the records are written by
``make_records`` and the models are built from small configs with random weights.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# Tiny models: one thread is faster than two fighting over small ops (and over a busy machine).
torch.set_num_threads(1)

WORDS = (
    "river stone light cloud green music paper table window garden summer winter bright "
    "quiet ocean forest mountain silver golden tiny large quick slow happy story"
).split()


def make_records(n: int, seed: int = 0) -> list[dict]:
    """Alpaca-shaped records with made-up text (a third of them with an input)."""
    rng = random.Random(seed)
    records = []
    for i in range(n):
        records.append(
            {
                "instruction": f"Write about the {rng.choice(WORDS)} {rng.choice(WORDS)} number {i}.",
                "input": "" if i % 3 else f"Use the word {rng.choice(WORDS)}.",
                "output": " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 12))) + ".",
            }
        )
    return records


@pytest.fixture
def records_file(tmp_path: Path) -> Path:
    path = tmp_path / "alpaca_fixture.json"
    path.write_text(json.dumps(make_records(40), indent=1))
    return path


TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)


def tiny_model(family: str = "llama", vocab_size: int = 320, dtype=torch.float32, seed: int = 0):
    """A tiny randomly initialised causal LM of the given family."""
    from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, OPTConfig

    torch.manual_seed(seed)
    if family == "llama":
        config = LlamaConfig(vocab_size=vocab_size, **TINY)
    elif family == "gemma":
        config = Gemma3TextConfig(vocab_size=vocab_size, head_dim=16, sliding_window=32, **TINY)
    elif family == "opt":
        config = OPTConfig(vocab_size=vocab_size, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                           num_attention_heads=4, max_position_embeddings=256, word_embed_proj_dim=64)
    else:
        raise ValueError(family)
    model = AutoModelForCausalLM.from_config(config)
    # Random init in HF is small; give weights a spread so QR and outputs are non-trivial.
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.2)
    return model.to(dtype).eval()


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    """A small word-level tokenizer (fast tokenizer, no downloads) with pad/eos/bos tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from oloraplus.data.records import PROMPT_NO_INPUT, PROMPT_WITH_INPUT

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}
    text = " ".join(WORDS) + PROMPT_WITH_INPUT + PROMPT_NO_INPUT + " Write about the number Use word . , : # ( ) "
    text += " ".join(str(i) for i in range(200))
    pre = pre_tokenizers.Whitespace()
    for word, _ in pre.pre_tokenize_str(text):
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                   bos_token="<bos>", unk_token="<unk>")
    assert len(fast) <= 320, len(fast)
    path = tmp_path_factory.mktemp("tok")
    fast.save_pretrained(path)
    return fast


def save_tiny_llama(path: Path, tokenizer) -> Path:
    """Save a tiny Llama checkpoint folder (config + safetensors + tokenizer) at ``path``."""
    model = tiny_model("llama")
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def tiny_checkpoint(tmp_path, tiny_tokenizer):
    """A saved tiny Llama checkpoint folder, new for each test."""
    return save_tiny_llama(tmp_path / "tiny-llama", tiny_tokenizer)


@pytest.fixture(scope="module")
def module_checkpoint(tmp_path_factory, tiny_tokenizer):
    """One saved tiny Llama checkpoint folder for a whole test module (for tests that only read it)."""
    return save_tiny_llama(tmp_path_factory.mktemp("ckpt") / "tiny-llama", tiny_tokenizer)


def assert_one_error_line(argv: list[str], capsys, *needles: str) -> str:
    """``oloraplus argv`` exits 2 with one ``error: ...`` line holding every needle, and no traceback."""
    from oloraplus.cli import main

    code = main(argv)
    captured = capsys.readouterr()
    assert code == 2, (argv, captured)
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert "Traceback" not in captured.err + captured.out
    return lines[0]
