"""``oloraplus generate``: try a trained adapter on prompts.

The adapter is checked against the base model (``method.identity``), loaded with PEFT (which
re-runs the OLoRA init for an ``adapter/`` folder; an ``adapter-lora/`` folder loads as is) and
merged into one fp32 model (``training.runtime.merged_for_eval``), as evaluation runs it.

Prompts are formatted as in training by default (``auto``: the format ``train`` recorded in the
adapter's ``oloraplus.json``): ``alpaca`` is the Alpaca template with the prompt text as the
instruction (``data.records.format_prompt``), ``chat`` the tokenizer's chat template with one user
message, ``none`` the text as given (what ``auto`` picks for prompt-completion data: write the
prompt as the prompt column held it, or as ``--template`` filled it in). An adapter without a recorded format
(another tool's) gets ``alpaca``. Decoding is greedy unless ``temperature > 0``, then
it samples (with ``top_p``) from a generator seeded with ``seed``, so a seed reproduces the output.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import torch

from oloraplus.data.records import format_prompt
from oloraplus.errors import UserError
from oloraplus.evaluation.generation import stop_token_ids
from oloraplus.files import write_text_atomic
from oloraplus.method.identity import adapter_prompt_format, check_adapter_identity
from oloraplus.models.loading import default_device, load_model
from oloraplus.training.runtime import merged_for_eval

TEMPLATES = ("auto", "alpaca", "chat", "none")

# The prompt template ``auto`` picks for each training data format.
TEMPLATE_OF_FORMAT = {"alpaca": "alpaca", "chat": "chat", "prompt-completion": "none"}


@dataclass
class GenerateSettings:
    """How ``generate`` formats prompts and decodes (the metadata gives the CLI flags' help)."""

    template: str = field(default="auto", metadata={
        "choices": TEMPLATES, "help": "auto: as the adapter was trained (its data format, recorded by 'oloraplus "
                                      "train'; alpaca if none is recorded); alpaca: the Alpaca template (the prompt "
                                      "as the instruction); chat: the tokenizer's chat template, one user message; "
                                      "none: the text as given"})
    max_new_tokens: int = field(default=128, metadata={"help": "most tokens generated per prompt"})
    temperature: float = field(default=0.0, metadata={"help": "0: greedy decoding; > 0: sample at this temperature"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling (with --temperature > 0)"})
    seed: int = field(default=0, metadata={"help": "seed of the sampling (the same seed gives the same output)"})

    def validate(self) -> None:
        if self.template not in TEMPLATES:
            raise UserError(f"--template must be one of {', '.join(TEMPLATES)}, got '{self.template}'")
        if self.max_new_tokens < 1:
            raise UserError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        if not self.temperature >= 0:
            raise UserError(f"--temperature must be >= 0 (0: greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.top_p != 1 and self.temperature == 0:
            raise UserError("--top-p needs sampling: give --temperature > 0 too")


def load_for_generation(model: str, adapter: str, device: str | None = None):
    """The base ``model`` with ``adapter`` merged in (fp32, KV cache on) and its tokenizer."""
    from peft import PeftModel

    adapter_dir = Path(adapter)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise UserError(f"{adapter_dir} is not a PEFT adapter folder (no adapter_config.json); pass RUN/adapter")
    base, tokenizer = load_model(model, device=device or default_device())
    check_adapter_identity(adapter_dir, base, model)  # before PEFT re-runs the init on it
    try:
        peft_model = PeftModel.from_pretrained(base, str(adapter_dir))
    except Exception as exc:
        raise UserError(f"cannot load adapter {adapter_dir} on model '{model}': {exc}") from exc
    merged = merged_for_eval(peft_model)
    merged.config.use_cache = True  # load_model turns it off for training
    return merged, tokenizer


def resolve_template(template: str, adapter: str) -> str:
    """``template``, or for ``auto`` the one that matches the adapter's training data (module docstring)."""
    if template != "auto":
        return template
    return TEMPLATE_OF_FORMAT.get(adapter_prompt_format(adapter) or "alpaca", "alpaca")


def prompt_ids(tokenizer, text: str, template: str) -> list[int]:
    """The token ids of ``text`` formatted with ``template`` (see the module docstring)."""
    if template == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise UserError("this tokenizer has no chat template; use --template alpaca or none")
        formatted = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                  add_generation_prompt=True)
        return tokenizer(formatted, add_special_tokens=False)["input_ids"]
    formatted = format_prompt({"instruction": text}) if template == "alpaca" else text
    return tokenizer(formatted, add_special_tokens=True)["input_ids"]  # as training tokenizes prompts


@torch.no_grad()
def generate_one(model, tokenizer, text: str, settings: GenerateSettings, streamer=None) -> str:
    """The response to one prompt (new tokens, special tokens skipped); ``streamer`` receives it as it grows."""
    ids = torch.tensor([prompt_ids(tokenizer, text, settings.template)], device=model.device)
    sampling = settings.temperature > 0
    kwargs = {"do_sample": sampling}
    if sampling:
        torch.manual_seed(settings.seed)  # generate() samples from the default generator
        kwargs.update(temperature=settings.temperature, top_p=settings.top_p, top_k=0)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=settings.max_new_tokens,
                         eos_token_id=stop_token_ids(model, tokenizer), pad_token_id=tokenizer.pad_token_id,
                         streamer=streamer, **kwargs)
    return tokenizer.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True).strip()


def read_prompts(path: str) -> list[str]:
    """Prompts from a ``.txt`` file (one per non-empty line) or a ``.jsonl`` file (a string, or an
    object with ``prompt`` or ``instruction``, per line)."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"prompt file not found: {path}")
    lines = [line for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if file.suffix != ".jsonl":
        prompts = lines
    else:
        prompts = []
        for n, line in enumerate(lines, 1):
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}: line {n} is not valid JSON ({exc.msg})") from None
            if isinstance(item, dict):
                item = item.get("prompt", item.get("instruction"))
            if not isinstance(item, str):
                raise UserError(f"{path}: line {n} must be a string or an object with a 'prompt' string")
            prompts.append(item)
    if not prompts:
        raise UserError(f"{path}: no prompts in the file")
    return prompts


def generate_command(model: str, adapter: str, prompt: str | None, input_file: str | None,
                     output: str | None, settings: GenerateSettings, stdout: TextIO) -> None:
    """``oloraplus generate``: stream one ``prompt`` to ``stdout``, or write one JSON line per
    prompt of ``input_file`` (``{"prompt", "response"}``) to ``output`` or ``stdout``."""
    if (prompt is None) == (input_file is None):
        raise UserError("give exactly one of --prompt TEXT and --input FILE")
    if output is not None and input_file is None:
        raise UserError("--output goes with --input (a single --prompt streams to the terminal)")
    settings.validate()
    prompts = read_prompts(input_file) if input_file else [prompt]
    if output is not None and Path(output).exists():
        raise UserError(f"--output {output} exists; choose a new file")
    settings.template = resolve_template(settings.template, adapter)
    merged, tokenizer = load_for_generation(model, adapter)
    if prompt is not None:
        generate_one(merged, tokenizer, prompt, settings, streamer=_streamer(tokenizer, stdout))
        stdout.write("\n")
        return
    rows = [json.dumps({"prompt": p, "response": generate_one(merged, tokenizer, p, settings)}) + "\n"
            for p in prompts]
    if output is None:
        stdout.writelines(rows)
    else:
        write_text_atomic(Path(output), "".join(rows))


def _streamer(tokenizer, stdout: TextIO):
    """transformers' ``TextStreamer`` that skips the prompt and writes to ``stdout``."""
    from transformers import TextStreamer

    class Streamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False):
            stdout.write(text)
            stdout.flush()

    return Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
