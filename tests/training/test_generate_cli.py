"""``oloraplus generate``: the merged adapter's greedy answer, JSON lines for a prompt file, seeded sampling."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import assert_one_error_line
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from oloraplus.cli import main
from oloraplus.data.records import format_prompt
from oloraplus.method.adapters import OLoRAPlusConfig, apply_olora
from oloraplus.method.identity import model_fingerprint, write_adapter_identity

PROMPT = "Write about the number 7"


def _base(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def adapter(module_checkpoint, tmp_path_factory):
    """A saved OLoRA adapter whose factors moved away from their start, with its identity file."""
    base = _base(module_checkpoint)
    fingerprint = model_fingerprint(base)
    model = apply_olora(base, OLoRAPlusConfig(rank=4, alpha=8))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.add_(0.1 * torch.randn(param.shape, generator=generator))
    folder = tmp_path_factory.mktemp("gen") / "adapter"
    model.save_pretrained(folder)
    write_adapter_identity(folder, fingerprint, str(module_checkpoint))
    return folder


def _generate(checkpoint, adapter, capsys, *flags: str) -> str:
    code = main(["generate", "--model", str(checkpoint), "--adapter", str(adapter), "--max-new-tokens", "8", *flags])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out


def test_greedy_answer_is_model_generate_on_the_merged_model(module_checkpoint, adapter, capsys):
    out = _generate(module_checkpoint, adapter, capsys, "--prompt", PROMPT)
    tokenizer = AutoTokenizer.from_pretrained(module_checkpoint)
    merged = PeftModel.from_pretrained(_base(module_checkpoint), str(adapter)).merge_and_unload()
    ids = tokenizer(format_prompt({"instruction": PROMPT}), return_tensors="pt")["input_ids"]
    with torch.no_grad():
        generated = merged.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                                    do_sample=False, pad_token_id=tokenizer.pad_token_id)
    expected = tokenizer.decode(generated[0, ids.shape[1]:], skip_special_tokens=True).strip()
    assert expected and out.strip() == expected


def test_a_prompt_file_gives_one_json_line_per_prompt(module_checkpoint, adapter, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": PROMPT}) + "\n" + json.dumps("Use word") + "\n")
    rows = [json.loads(line) for line in _generate(module_checkpoint, adapter, capsys, "--input", str(prompts))
            .splitlines()]
    assert [r["prompt"] for r in rows] == [PROMPT, "Use word"]
    single = _generate(module_checkpoint, adapter, capsys, "--prompt", PROMPT).strip()
    assert rows[0]["response"] == single
    out = tmp_path / "answers.jsonl"
    assert _generate(module_checkpoint, adapter, capsys, "--input", str(prompts), "--output", str(out)) == ""
    assert [json.loads(line) for line in out.read_text().splitlines()] == rows


def test_sampling_with_a_seed_is_reproducible(module_checkpoint, adapter, capsys):
    flags = ("--prompt", PROMPT, "--temperature", "1.5", "--top-p", "0.95")
    first = _generate(module_checkpoint, adapter, capsys, *flags, "--seed", "3")
    assert _generate(module_checkpoint, adapter, capsys, *flags, "--seed", "3") == first


@pytest.mark.parametrize(("flags", "needle"), [
    (["--adapter", "NOTADAPTER", "--prompt", "x"], "no adapter_config.json"),
    (["--prompt", "x", "--input", "FILE"], "exactly one of --prompt TEXT and --input FILE"),
    ([], "exactly one of --prompt TEXT and --input FILE"),
    (["--prompt", "x", "--template", "chat"], "has no chat template"),
    (["--prompt", "x", "--top-p", "0.5"], "--top-p needs sampling"),
    (["--input", "missing.txt"], "prompt file not found"),
    (["--prompt", "x", "--output", "EXISTS"], "--output goes with --input"),
    (["--input", "GOOD", "--output", "EXISTS"], "exists; choose a new file"),
    (["--input", "BADJSON"], "line 2 is not valid JSON"),
    (["--input", "NOTPROMPT"], "line 1 must be a string or an object with a 'prompt' string"),
    (["--input", "EMPTY"], "no prompts in the file"),
    (["--prompt", "x", "--temperature", "-1"], "--temperature must be >= 0"),
])
def test_generate_errors_are_one_line(module_checkpoint, adapter, tmp_path, capsys, flags, needle):
    files = {"GOOD": ("p.txt", "hello\n"), "EXISTS": ("out.jsonl", "old\n"), "BADJSON": ("b.jsonl", '"a"\n{\n'),
             "NOTPROMPT": ("n.jsonl", '{"text": "a"}\n'), "EMPTY": ("e.txt", "\n \n")}
    for key, (name, text) in files.items():
        (tmp_path / name).write_text(text)
    flags = [str(tmp_path / "none") if f == "NOTADAPTER" else str(tmp_path / files[f][0]) if f in files else f
             for f in flags]
    argv = ["generate", "--model", str(module_checkpoint), "--adapter", str(adapter), *flags]
    assert_one_error_line(argv, capsys, needle)
