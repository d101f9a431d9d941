"""Tripwires for the speed patches of ``oloraplus.fast``, and the ``--fast``/``--no-fast`` switch.

Every patch of a library internal (listed in ``oloraplus.fast``'s docstring) has one test here
that fails, with a message naming the library, the internal and the oloraplus module relying on
it, when a new transformers, PEFT, torch or glibc changes that internal. transformers and PEFT are
pinned to the tested minor versions in pyproject.toml; raising a pin means running these first.
Until a broken patch is fixed, ``--no-fast`` trains without any of them.

Then the switch itself: fast off and fast on learn and evaluate the same function (tiny model,
fp32), and fast off runs end to end without touching anything in ``oloraplus.fast``.
"""

from __future__ import annotations

import ctypes
import inspect
import json
import os
import platform
import subprocess
import sys

import pytest
import torch
from conftest import make_records, tiny_model

from oloraplus.data.batching import Collator, ExampleDataset, collate
from oloraplus.data.tokenize import tokenize_records
from oloraplus.fast.memory import HUGE_PAGES_ENV
from oloraplus.method.adapters import OLoRAPlusConfig, apply_olora

PIN = "pinned in pyproject.toml; until the patch is fixed, train with --no-fast"


def broken(library: str, internal: str, user: str, detail: str = "") -> str:
    """The message of a tripwire: which internal of which library changed, and who relies on it."""
    return f"{library} changed {internal}, which {user} relies on{': ' + detail if detail else ''} ({PIN})"


def lora_linear(model):
    from peft.tuners.lora.layer import Linear as LoraLinear

    return next(m for m in model.modules() if isinstance(m, LoraLinear))


# 1. fast.head_loss: the head's forward replaced on the instance ------------------------------


@pytest.mark.parametrize("family", ["llama", "gemma", "opt"])
def test_output_embeddings_forward_is_swappable(family):
    from oloraplus.fast.head_loss import head_inputs

    model = apply_olora(tiny_model(family), OLoRAPlusConfig(rank=4)).eval()
    base = model.get_base_model()
    head = base.get_output_embeddings()
    assert type(head) is torch.nn.Linear, broken(
        "transformers", f"{type(base).__name__}.get_output_embeddings() (not an nn.Linear: {type(head).__name__})",
        "oloraplus.fast.head_loss.fusable_head")
    ids = torch.randint(0, 320, (2, 7))
    with torch.no_grad(), head_inputs(head) as captured:
        logits = model(input_ids=ids).logits
    assert len(captured) == 1 and captured[0].shape[-1] == head.in_features and logits.shape[-1] == 0, broken(
        "transformers", f"the call of get_output_embeddings() in {type(base).__name__}.forward (an instance-level "
        "forward on the head is no longer what computes the logits)", "oloraplus.fast.head_loss.head_inputs")
    assert "forward" not in head.__dict__
    with torch.no_grad():
        assert model(input_ids=ids).logits.shape[-1] == 320


# 2. fast.addmm: PEFT's lora_variant hook -----------------------------------------------------


def test_peft_lora_variant_hook():
    from peft.tuners.lora.layer import LoraVariant

    from oloraplus.fast.addmm import AddmmLoRA

    user = "oloraplus.fast.addmm.AddmmLoRA"
    expected = {"forward": ["module", "active_adapter", "x", "result"],
                "merge_safe": ["module", "active_adapter", "orig_weight"],
                "merge_unsafe": ["module", "active_adapter", "orig_weight"],
                "unmerge": ["module", "active_adapter", "orig_weight"]}
    for name, params in expected.items():
        method = getattr(LoraVariant, name, None)
        assert method is not None, broken("peft", f"LoraVariant.{name} (gone)", user)
        got = [p for p in inspect.signature(method).parameters if p not in ("kwargs",)]
        assert got == params, broken("peft", f"the signature of LoraVariant.{name}", user, f"{got} != {params}")

    model = apply_olora(tiny_model("llama"), OLoRAPlusConfig(rank=4)).eval()
    layer = lora_linear(model)
    assert isinstance(getattr(layer, "lora_variant", None), dict), broken(
        "peft", "LoraLayer.lora_variant (no longer a dict of adapter name -> LoraVariant)", user)

    calls = []

    class Recording(AddmmLoRA):
        @staticmethod
        def forward(module, active_adapter, x, result, **kwargs):
            calls.append("forward")
            return AddmmLoRA.forward(module, active_adapter, x, result, **kwargs)

        @staticmethod
        def merge_safe(module, active_adapter, orig_weight):
            calls.append("merge_safe")
            return AddmmLoRA.merge_safe(module, active_adapter, orig_weight)

        @staticmethod
        def merge_unsafe(module, active_adapter, orig_weight):
            calls.append("merge_unsafe")
            AddmmLoRA.merge_unsafe(module, active_adapter, orig_weight)

        @staticmethod
        def unmerge(module, active_adapter, orig_weight):
            calls.append("unmerge")
            return AddmmLoRA.unmerge(module, active_adapter, orig_weight)

    layer.lora_variant["default"] = Recording()
    x = torch.randn(3, layer.in_features)
    with torch.no_grad():
        layer(x)
        layer.merge(safe_merge=True)
        layer.unmerge()
        layer.merge()
        layer.unmerge()
    assert calls == ["forward", "merge_safe", "unmerge", "merge_unsafe", "unmerge"], broken(
        "peft", "when lora.Linear calls its lora_variant's forward/merge_safe/merge_unsafe/unmerge", user,
        f"calls {calls}")


# 3. fast.precision: PEFT's cast of adapter inputs --------------------------------------------


def test_peft_cast_input_dtype_enabled():
    user = "oloraplus.fast.precision.prepare_for_compute"
    model = apply_olora(tiny_model("llama"), OLoRAPlusConfig(rank=4)).eval()
    layer = lora_linear(model)
    assert getattr(layer, "cast_input_dtype_enabled", None) is True, broken(
        "peft", "BaseTunerLayer.cast_input_dtype_enabled (gone, or no longer True by default)", user)
    layer.base_layer.to(torch.bfloat16)
    seen = []
    layer.lora_A["default"].register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    x = torch.randn(3, layer.in_features, dtype=torch.bfloat16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        layer(x)
        layer.cast_input_dtype_enabled = False
        layer(x)
    assert seen == [torch.float32, torch.bfloat16], broken(
        "peft", "what cast_input_dtype_enabled does (the cast of each adapter's input to its weight dtype)", user,
        f"adapter input dtypes {seen}")


# 4. fast.precision: frozen weights stored in bf16 --------------------------------------------


def test_bf16_storage_of_frozen_weights():
    from oloraplus.fast.precision import prepare_for_compute
    from oloraplus.training.runtime import merged_for_eval

    user = "oloraplus.fast.precision.prepare_for_compute"
    model = apply_olora(tiny_model("llama"), OLoRAPlusConfig(rank=4)).eval()
    ids = torch.randint(0, 320, (2, 9))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reference = model(input_ids=ids, labels=ids).loss.detach()
    prepare_for_compute(model, "bf16", "cpu")
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert all(d == (torch.float32 if "lora_" in n else torch.bfloat16) for n, d in dtypes.items())
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
    except RuntimeError as exc:
        pytest.fail(broken("torch/peft", "mixed-dtype forward (bf16 frozen weights, fp32 adapters, autocast)", user,
                           str(exc)))
    grads = [p.grad for n, p in model.named_parameters() if p.requires_grad]
    assert grads and all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads), \
        broken("torch/peft", "the gradients of fp32 adapters over bf16 frozen weights", user)
    torch.testing.assert_close(loss.detach(), reference, rtol=2e-2, atol=2e-2)
    merged = merged_for_eval(model)
    assert all(p.dtype == torch.float32 for p in merged.parameters()), broken(
        "peft", "merge_and_unload over bf16 base weights upcast by Module.float()", "oloraplus.training.runtime")


# 5. fast.compile: Module._compiled_call_impl -------------------------------------------------


def test_module_compiled_call_impl():
    user = "oloraplus.fast.compile (uncompile_layers)"
    layer = torch.nn.Linear(2, 2)
    assert hasattr(layer, "_compiled_call_impl") and layer._compiled_call_impl is None, broken(
        "torch", "nn.Module._compiled_call_impl (gone, or not None on a new module)", user)
    layer.compile(dynamic=True)  # lazy: nothing is compiled until the first call
    assert layer._compiled_call_impl is not None, broken("torch", "nn.Module.compile (no _compiled_call_impl set)",
                                                         user)
    assert "_compiled_call_impl" in inspect.getsource(torch.nn.Module._wrapped_call_impl), broken(
        "torch", "nn.Module._wrapped_call_impl (no longer dispatches on _compiled_call_impl)", user)
    layer._compiled_call_impl = None
    assert layer(torch.ones(1, 2)).shape == (1, 2)


# 6. fast.trainer: Trainer._get_train_sampler -------------------------------------------------


def test_trainer_get_train_sampler(tmp_path, tiny_tokenizer, monkeypatch):
    from transformers import Trainer, TrainingArguments

    import oloraplus.fast.trainer as fast_trainer

    user = "oloraplus.fast.trainer.FastTrainerMixin._get_train_sampler"
    method = getattr(Trainer, "_get_train_sampler", None)
    assert method is not None, broken("transformers", "Trainer._get_train_sampler (gone)", user)
    params = list(inspect.signature(method).parameters.values())
    assert [p.name for p in params] == ["self", "train_dataset"] and params[1].default is None, broken(
        "transformers", "the signature of Trainer._get_train_sampler", user, str(inspect.signature(method)))
    for name in ("train_sampling_strategy", "per_device_train_batch_size", "world_size", "seed"):
        assert hasattr(TrainingArguments, name), broken("transformers", f"TrainingArguments.{name}", user)

    made = []

    class Recorded(fast_trainer.LengthGroupedSampler):
        def __iter__(self):
            made.append(self)
            return super().__iter__()

    monkeypatch.setattr(fast_trainer, "LengthGroupedSampler", Recorded)

    class Fast(fast_trainer.FastTrainerMixin, Trainer):
        pass

    examples, _ = tokenize_records(make_records(12), tiny_tokenizer, max_length=64)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, use_cpu=True, report_to=[],
                             train_sampling_strategy="group_by_length", remove_unused_columns=False)
    trainer = Fast(model=tiny_model("llama"), args=args, train_dataset=ExampleDataset(examples),
                   data_collator=Collator(tiny_tokenizer.pad_token_id))
    batches = list(trainer.get_train_dataloader())
    assert len(made) == 1 and sum(len(b["input_ids"]) for b in batches) == 12, broken(
        "transformers", "Trainer.get_train_dataloader (no longer samples with self._get_train_sampler())", user)


# 7. fast.attention + fast.trainer: the attention kernel switched per batch -------------------


def test_attention_switch_and_registry():
    from transformers import AttentionInterface, PreTrainedModel
    from transformers.masking_utils import AttentionMaskInterface, eager_mask
    from transformers.models.llama.modeling_llama import eager_attention_forward

    from oloraplus.fast.attention import GROUPED, current_attention, use_attention

    user = "oloraplus.fast.attention (use_attention, _register_grouped) and oloraplus.fast.trainer"
    assert callable(getattr(PreTrainedModel, "set_attn_implementation", None)), broken(
        "transformers", "PreTrainedModel.set_attn_implementation (gone)", user)
    for registry in (AttentionInterface, AttentionMaskInterface):
        assert callable(getattr(registry, "register", None)), broken("transformers", f"{registry.__name__}.register",
                                                                     user)
    calls = []

    def spy(*args, **kwargs):
        calls.append(1)
        return eager_attention_forward(*args, **kwargs)

    AttentionInterface.register("oloraplus_tripwire", spy)
    AttentionMaskInterface.register("oloraplus_tripwire", eager_mask)
    model = apply_olora(tiny_model("llama"), OLoRAPlusConfig(rank=4)).eval()
    ids = torch.randint(0, 320, (2, 6))
    with torch.no_grad():
        reference = model(input_ids=ids).logits
        loaded = current_attention(model)
        assert loaded in ("sdpa", "eager"), broken("transformers", "config._attn_implementation (not readable)", user)
        use_attention(model, "oloraplus_tripwire")
        assert current_attention(model) == "oloraplus_tripwire", broken(
            "transformers", "set_attn_implementation (config._attn_implementation not updated)", user)
        switched = model(input_ids=ids).logits
        assert len(calls) == 2, broken(  # one call per decoder layer
            "transformers", "dispatch through AttentionInterface after set_attn_implementation", user,
            f"{len(calls)} calls of the registered kernel")
        use_attention(model, GROUPED)
        grouped = model(input_ids=ids).logits
        use_attention(model, loaded)
        assert current_attention(model) == loaded
    torch.testing.assert_close(switched, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grouped, reference, rtol=1e-5, atol=1e-5)


# 8. models.loading.convert_gguf: the quantizer marker dropped (not a speed patch) ------------


def test_gguf_quantizer_marker():
    """A GGUF load sets ``model.hf_quantizer`` on the instance; ``save_pretrained`` reads it (and would
    save the quantizer's state dict and config); ``convert_gguf`` sets it to None before saving."""
    from transformers import PreTrainedModel

    assert "hf_quantizer" in inspect.getsource(PreTrainedModel.save_pretrained), broken(
        "transformers", "PreTrainedModel.save_pretrained (no longer reads model.hf_quantizer)",
        "oloraplus.models.loading.convert_gguf", "setting it to None may no longer save a plain checkpoint")


def write_tiny_gguf(path):
    """A tiny fp32 Llama GGUF file (one layer, 64-token byte-level vocabulary), made with ``gguf``."""
    import gguf
    import numpy as np

    vocab, hidden, inner, heads, kv_heads = 64, 16, 32, 2, 1
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(64)
    writer.add_embedding_length(hidden)
    writer.add_block_count(1)
    writer.add_feed_forward_length(inner)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(["<|endoftext|>"] + [chr(97 + i % 26) + ("" if i < 26 else str(i)) for i in range(vocab - 1)])
    writer.add_token_types([3] + [1] * (vocab - 1))
    writer.add_token_scores([0.0] * vocab)
    writer.add_token_merges([])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(0)
    rng = np.random.default_rng(0)
    kv = kv_heads * hidden // heads
    shapes = {"token_embd.weight": (vocab, hidden), "output_norm.weight": (hidden,), "output.weight": (vocab, hidden),
              "blk.0.attn_norm.weight": (hidden,), "blk.0.ffn_norm.weight": (hidden,),
              "blk.0.attn_q.weight": (hidden, hidden), "blk.0.attn_k.weight": (kv, hidden),
              "blk.0.attn_v.weight": (kv, hidden), "blk.0.attn_output.weight": (hidden, hidden),
              "blk.0.ffn_gate.weight": (inner, hidden), "blk.0.ffn_up.weight": (inner, hidden),
              "blk.0.ffn_down.weight": (hidden, inner)}
    for name, shape in shapes.items():
        writer.add_tensor(name, (rng.standard_normal(shape) * 0.1).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_model_saves_without_its_quantizer(tmp_path):
    from transformers import AutoModelForCausalLM

    from oloraplus.models.loading import convert_gguf, load_model

    user = "oloraplus.models.loading.convert_gguf"
    gguf_file = write_tiny_gguf(tmp_path / "tiny.gguf")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=gguf_file.name, dtype=torch.float32)
    assert loaded.hf_quantizer is not None and loaded.is_quantized, (
        "transformers no longer marks a GGUF-loaded model as quantized (model.hf_quantizer): "
        f"{user} may no longer need to drop the marker")
    out = convert_gguf(gguf_file, tmp_path / "converted")
    assert "quantization_config" not in json.loads((out / "config.json").read_text()), broken(
        "transformers", "save_pretrained with hf_quantizer = None (it still writes a quantization_config)", user)
    model, tokenizer = load_model(str(out))
    assert getattr(model, "hf_quantizer", None) is None and not getattr(model, "is_quantized", False), broken(
        "transformers", "hf_quantizer / quantization_config of a saved dequantised GGUF model", user)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=torch.arange(8)[None]).logits,
                                   loaded(input_ids=torch.arange(8)[None]).logits)


# 9. fast.logits_mask / fast.head_loss: a boolean logits_to_keep ------------------------------


@pytest.mark.parametrize("family", ["llama", "gemma", "opt"])
def test_boolean_logits_to_keep(family):
    from oloraplus.fast.logits_mask import kept_logits

    model = tiny_model(family)
    ids = torch.randint(0, 320, (3, 8))
    keep = torch.zeros(3, 8, dtype=torch.bool)
    keep[0, 2:5] = keep[1, 7] = keep[2, :] = True
    with torch.no_grad():
        full = model(input_ids=ids).logits
        kept = model(input_ids=ids, logits_to_keep=keep).logits
    assert kept.shape == (int(keep.sum()), 320), broken(
        "transformers", f"{type(model).__name__}.forward with a 2-D boolean logits_to_keep (slice_logits_to_keep)",
        "oloraplus.fast.logits_mask and oloraplus.fast.head_loss", f"logits of shape {tuple(kept.shape)}")
    torch.testing.assert_close(kept, full[keep], rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(kept_logits(model, ids, torch.ones_like(ids), keep), full[keep], rtol=1e-5,
                                   atol=1e-5)


# 10. fast.memory: glibc mallopt --------------------------------------------------------------


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_glibc_mallopt():
    assert hasattr(ctypes.CDLL(None), "mallopt"), broken("glibc", "mallopt (not exported)",
                                                         "oloraplus.fast.memory.keep_freed_memory")
    # In a fresh interpreter: the setting is process-wide. M_MMAP_MAX = -4, M_TRIM_THRESHOLD = -1.
    code = "import ctypes; m = ctypes.CDLL(None).mallopt; print(m(-4, 0), m(-1, 2**31 - 1))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["1", "1"], broken("glibc", "mallopt(M_MMAP_MAX) / mallopt(M_TRIM_THRESHOLD)",
                                     "oloraplus.fast.memory.keep_freed_memory", f"returned {out}")


def test_glibc_malloc_trim_returns_freed_heap_pages():
    """With mmap off, a freed 256 MB block stays resident until malloc_trim(0) hands it back."""
    assert hasattr(ctypes.CDLL(None), "malloc_trim"), broken("glibc", "malloc_trim (not exported)",
                                                             "oloraplus.fast.memory.release_freed_memory")
    code = ("import ctypes, re\n"
            "from oloraplus.fast.memory import keep_freed_memory, release_freed_memory\n"
            "rss = lambda: int(re.search(r'VmRSS:\\s+(\\d+)', open('/proc/self/status').read()).group(1)) // 1024\n"
            "keep_freed_memory('cpu'); libc = ctypes.CDLL(None)\n"
            "libc.malloc.restype = ctypes.c_void_p; libc.free.argtypes = [ctypes.c_void_p]\n"
            "keep = libc.malloc(1 << 20)  # above the big block: the heap's top stays in use\n"
            "p = libc.malloc(256 << 20); ctypes.memset(p, 1, 256 << 20)\n"
            "guard = libc.malloc(1 << 20); ctypes.memset(guard, 1, 1 << 20)\n"
            "libc.free(p); before = rss(); release_freed_memory('cpu'); print(before - rss())")
    freed_mb = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert freed_mb > 200, broken("glibc", "malloc_trim(0) (free pages inside the heap no longer released)",
                                  "oloraplus.fast.memory.release_freed_memory", f"released {freed_mb} MB")


# 11. fast.dropout: PEFT's lora_dropout module ------------------------------------------------


def test_peft_lora_dropout_module():
    from oloraplus.fast.addmm import AddmmLoRA

    user = "oloraplus.fast.addmm.AddmmLoRA (through oloraplus.fast.dropout.dropout_lora_a)"
    model = apply_olora(tiny_model("llama"), OLoRAPlusConfig(rank=4, dropout=0.25)).train()
    layer = lora_linear(model)
    dropout = layer.lora_dropout["default"] if "default" in getattr(layer, "lora_dropout", {}) else None
    assert type(dropout) is torch.nn.Dropout and dropout.p == 0.25 and dropout.training and not dropout.inplace, broken(
        "peft", "LoraLayer.lora_dropout[adapter] (no longer an nn.Dropout holding the configured p)", user,
        f"{dropout!r}")
    model.eval()
    assert not dropout.training, broken("peft", "lora_dropout's training flag (no longer follows the model's)", user)
    plain = lora_linear(apply_olora(tiny_model("llama"), OLoRAPlusConfig(rank=4, dropout=0.0)))
    assert not (isinstance(plain.lora_dropout["default"], torch.nn.Dropout) and plain.lora_dropout["default"].p > 0)
    kept = torch.nn.Dropout(0.5).train()(torch.ones(4000)).unique().tolist()
    assert kept == [0.0, 2.0], broken("torch", "nn.Dropout (no longer inverted dropout)", user, f"values {kept}")

    seen = []

    class Recording(AddmmLoRA):
        @staticmethod
        def forward(module, active_adapter, x, result, **kwargs):
            seen.append(x)
            return AddmmLoRA.forward(module, active_adapter, x, result, **kwargs)

    model.train()
    layer.lora_dropout["default"] = torch.nn.Dropout(0.5)
    layer.lora_variant["default"] = Recording()
    x = torch.randn(3, layer.in_features)
    with torch.no_grad():
        layer(x)
    assert len(seen) == 1 and torch.equal(seen[0], x), broken(
        "peft", "lora.Linear.forward with a lora_variant (the input reaching the variant is no longer the undropped "
        "x: PEFT now applies lora_dropout itself, and the variant's dropout would be applied twice)", user)


# 12. fast.memory: PyTorch's THP_MEM_ALLOC_ENABLE -----------------------------------------------

_ALIGNMENTS = ("import torch\n"
               "blocks = [torch.empty((3 << 20) + 4097 * k, dtype=torch.uint8) for k in range(1, 6)]  # all alive\n"
               "print([b.data_ptr() % 4096 for b in blocks])")


def _run_fresh(code: str, **env) -> list[str]:
    environ = {k: v for k, v in os.environ.items() if k != HUGE_PAGES_ENV} | env
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=environ)
    return out.stdout.strip().splitlines()


def test_torch_thp_mem_alloc_enable():
    """PyTorch reads THP_MEM_ALLOC_ENABLE at its first allocation and then page-aligns its blocks
    (the large ones advised for huge pages); "0", PyTorch's default, leaves them 64-byte aligned."""
    on = _run_fresh(_ALIGNMENTS, **{HUGE_PAGES_ENV: "1"})[-1]
    off = _run_fresh(_ALIGNMENTS, **{HUGE_PAGES_ENV: "0"})[-1]
    assert on == "[0, 0, 0, 0, 0]", broken("torch", "THP_MEM_ALLOC_ENABLE (blocks no longer page-aligned)",
                                           "oloraplus.fast.memory.use_huge_page_allocations", on)
    assert off != "[0, 0, 0, 0, 0]", broken("torch", "its CPU allocator's default alignment",
                                            "tests of oloraplus.fast.memory (they cannot tell the setting apart)", off)


def test_use_huge_page_allocations_before_torch_only():
    first = "from oloraplus.fast.memory import use_huge_page_allocations as use\nprint(use())\n"
    assert _run_fresh(first + _ALIGNMENTS) == ["True", "[0, 0, 0, 0, 0]"]
    # the environment's own value wins: 0 opts out
    assert _run_fresh(first + _ALIGNMENTS, **{HUGE_PAGES_ENV: "0"})[0] == "False"
    # too late once torch is imported: nothing is set, and it says so
    late = "import os, torch\n" + first + f"print(os.environ.get('{HUGE_PAGES_ENV}'))"
    assert _run_fresh(late) == ["False", "None"]
    # a child's environment is prepared whatever this process has imported
    child = "import torch\nfrom oloraplus.fast.memory import use_huge_page_allocations as use\nenv = {}\n" \
            "print(use(env), env)"
    assert _run_fresh(child) == [f"True {{'{HUGE_PAGES_ENV}': '1'}}"]


def test_the_oloraplus_command_sets_huge_page_allocations_before_torch():
    code = ("import sys\nsys.argv = ['oloraplus', '--help']\nfrom oloraplus.__main__ import main\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n" + _ALIGNMENTS)
    assert _run_fresh(code)[-1] == "[0, 0, 0, 0, 0]"


# The switch -------------------------------------------------------------------------------


def test_plain_and_fast_loss_paths_agree(tiny_tokenizer):
    """method.loss with fast=False (full logits, rows selected) equals the fused/masked path."""
    from oloraplus.method.loss import response_logits, response_loss

    model = apply_olora(tiny_model("llama", vocab_size=len(tiny_tokenizer)), OLoRAPlusConfig(rank=4)).eval()
    examples, _ = tokenize_records(make_records(6), tiny_tokenizer, max_length=256)
    batch = collate(examples, tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        for reduction in ("mean", "sum"):
            torch.testing.assert_close(response_loss(model, **batch, reduction=reduction, fast=False),
                                       response_loss(model, **batch, reduction=reduction, fast=True),
                                       rtol=1e-6, atol=1e-5)
        plain, targets = response_logits(model, **batch, fast=False)
        masked, masked_targets = response_logits(model, **batch, fast=True)
        torch.testing.assert_close(plain, masked, rtol=1e-5, atol=1e-5)
        assert torch.equal(targets, masked_targets)
        torch.testing.assert_close(response_loss(model, **batch, fast=False), model(**batch).loss, rtol=1e-5,
                                   atol=1e-6)


def _run(tmp_path, checkpoint, records, name: str, fast: bool, **overrides):
    from oloraplus.training.config import TrainConfig
    from oloraplus.training.recipe import train

    settings = dict(output=str(tmp_path / name), model=str(checkpoint), data=str(records), method="olora-plus",
                    ratio=4.0, rank=4, batch_size=4, n_train=16, n_eval=6, max_steps=3, lr=5e-3, seed=1,
                    precision="fp32", max_new_tokens=3, metrics_mode="teacher-forced", progress=False, fast=fast)
    return train(TrainConfig(**{**settings, **overrides}))


def test_fast_off_and_on_learn_and_evaluate_the_same(tmp_path, tiny_checkpoint, records_file, monkeypatch):
    """Same batches (random order: the two length-grouped samplers differ by design), fp32: the
    patches change only rounding."""
    from oloraplus.training import recipe

    monkeypatch.setattr(recipe, "default_device", lambda: "cpu")
    fast = _run(tmp_path, tiny_checkpoint, records_file, "fast", True, group_by_length=False)
    plain = _run(tmp_path, tiny_checkpoint, records_file, "plain", False, group_by_length=False)
    assert (fast["config"]["fast"], plain["config"]["fast"]) == (True, False)
    assert fast["training"]["steps"] == plain["training"]["steps"] == 3
    assert plain["metrics"]["eval_loss"] == pytest.approx(fast["metrics"]["eval_loss"], rel=1e-4)
    assert plain["training"]["train_loss"] == pytest.approx(fast["training"]["train_loss"], rel=1e-4)
    saved = json.loads((tmp_path / "plain" / "results.json").read_text())
    assert saved["config"]["fast"] is False


def test_fast_off_runs_end_to_end_without_any_patch(tmp_path, tiny_checkpoint, records_file, monkeypatch):
    """--no-fast: train and evaluate through the CLI with every entry point into oloraplus.fast
    made to fail; the Trainer's own sampler and the model's own loss are used."""
    from transformers import Trainer

    import oloraplus.fast.attention as fast_attention
    import oloraplus.fast.trainer as fast_trainer
    import oloraplus.method.loss as method_loss
    from oloraplus.cli import main
    from oloraplus.method.trainer import OLoRAPlusTrainer
    from oloraplus.training import recipe

    def refuse(*args, **kwargs):
        raise AssertionError("a speed patch ran with --no-fast")

    monkeypatch.setattr(recipe, "default_device", lambda: "cpu")
    for module, name in [(recipe, "prepare_for_compute"), (recipe, "keep_freed_memory"), (recipe, "compile_layers"),
                         (method_loss, "fused_response_loss"), (method_loss, "kept_logits"),
                         (fast_attention, "use_attention"), (fast_trainer, "use_attention"),
                         (fast_trainer.FastTrainerMixin, "_get_train_sampler")]:
        monkeypatch.setattr(module, name, refuse)
    trainers, samplers = [], []
    original_sampler = Trainer._get_train_sampler

    def own_sampler(self, train_dataset=None):
        trainers.append(type(self))
        samplers.append(original_sampler(self, train_dataset))
        return samplers[-1]

    monkeypatch.setattr(Trainer, "_get_train_sampler", own_sampler)
    common = ["--model", str(tiny_checkpoint), "--data", str(records_file), "--n-train", "8", "--n-eval", "3",
              "--max-new-tokens", "2", "--precision", "fp32", "--no-progress"]
    run = tmp_path / "run"
    train_args = ["train", *common, "--method", "olora-plus", "--ratio", "4", "--rank", "4", "--batch-size", "4",
                  "--max-steps", "2", "--output", str(run)]
    assert main([*train_args, "--no-fast"]) == 0
    assert main(["evaluate", *common, "--no-fast", "--adapter", str(run / "adapter"), "--output",
                 str(tmp_path / "eval")]) == 0
    evaluated = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert evaluated["config"]["fast"] is False and evaluated["metrics"]["eval_loss"] > 0
    results = json.loads((run / "results.json").read_text())
    assert results["config"]["fast"] is False and results["training"]["steps"] == 2
    assert set(trainers) == {OLoRAPlusTrainer}  # the plain trainer, with the Trainer's own length grouping
    assert type(samplers[0]).__module__.startswith("transformers")



@pytest.mark.parametrize("checkpointing", [False, True])
def test_freed_memory_policy_is_set_before_loading_or_after_preparation(tmp_path, tiny_checkpoint, records_file,
                                                                        monkeypatch, checkpointing):
    """--fast keeps freed memory for reuse from before the model is loaded; with
    --gradient-checkpointing only after the model is prepared (the fp32 copies freed by the bf16
    storage are then unmapped, not kept), after one release of the heap's free pages."""
    from oloraplus.cli import main
    from oloraplus.training import recipe

    events = []

    def recording(name, original=None):
        def wrapper(*args, **kwargs):
            events.append(name)
            return original(*args, **kwargs) if original else None
        return wrapper

    monkeypatch.setattr(recipe, "default_device", lambda: "cpu")
    monkeypatch.setattr(recipe, "keep_freed_memory", recording("keep"))
    monkeypatch.setattr(recipe, "release_freed_memory", recording("release"))
    monkeypatch.setattr(recipe, "load_model", recording("load", recipe.load_model))
    monkeypatch.setattr(recipe, "prepare_for_compute", recording("prepare", recipe.prepare_for_compute))
    args = ["train", "--model", str(tiny_checkpoint), "--data", str(records_file), "--n-train", "8", "--n-eval", "3",
            "--max-new-tokens", "2", "--no-progress", "--method", "olora", "--rank", "4", "--batch-size", "4",
            "--max-steps", "1", "--output", str(tmp_path / "run")]
    assert main([*args, *(["--gradient-checkpointing"] if checkpointing else [])]) == 0
    assert events == (["load", "prepare", "release", "keep"] if checkpointing else ["keep", "load", "prepare"])


def test_no_fast_refuses_fast_only_flags(tmp_path):
    from oloraplus.errors import UserError
    from oloraplus.training.config import TrainConfig
    from oloraplus.training.recipe import train

    for flags in ({"compile": True}, {"attention": "grouped"}):
        with pytest.raises(UserError, match="speed patches of --fast"):
            train(TrainConfig(output=str(tmp_path / "x"), method="olora", fast=False, **flags))
