"""Speed patches: every place oloraplus reaches into a library's internals to train or evaluate faster.

Each one computes the same function as the plain PEFT + Trainer path (the tests compare them), and
each has a tripwire test in ``tests/fast/test_fast.py`` that fails with a clear message when the
internal it relies on changes. One switch turns them all (but patch 12) on or off: ``TrainConfig.fast``
(``--fast``/``--no-fast``). Off, ``training.recipe`` trains with the plain ``OLoRAPlusTrainer``:
the Trainer's own sampler, its bf16 autocast, the model's own loss from ``labels``, the model's
loaded attention kernel and PEFT's layers as PEFT built them; evaluation computes every
position's logits and selects the response rows. Library code takes the switch as an argument
(``method.loss.response_loss(fast=...)``, ``evaluation.evaluate.eval_loss(fast=...)``,
``OLoRAPlusTrainer(head_on_labels_only=...)``).

Patch (module) -- internal relied on -- tripwire in tests/fast/test_fast.py:

1. head input captured, head + loss fused (``head_loss``) -- an instance-level ``forward`` on the
   module ``get_output_embeddings()`` returns -- ``test_output_embeddings_forward_is_swappable``
2. LoRA update inside the up-projection's matmul (``addmm``) -- PEFT's ``LoraLayer.lora_variant``
   dict and the ``LoraVariant`` interface -- ``test_peft_lora_variant_hook``
3. no fp32 cast of adapter inputs under bf16 (``precision``) -- PEFT's
   ``BaseTunerLayer.cast_input_dtype_enabled`` -- ``test_peft_cast_input_dtype_enabled``
4. frozen base weights stored in bf16 (``precision``) -- replacing a frozen weight's
   ``param.data`` by a bf16 tensor under PEFT + autocast -- ``test_bf16_storage_of_frozen_weights``
5. regional compilation (``compile``) -- ``torch.nn.Module._compiled_call_impl`` --
   ``test_module_compiled_call_impl``
6. length-grouped sampler (``trainer``) -- ``transformers.Trainer._get_train_sampler(train_dataset)``
   -- ``test_trainer_get_train_sampler``
7. attention kernel per batch (``trainer``, ``attention``) --
   ``PreTrainedModel.set_attn_implementation``, ``config._attn_implementation``,
   ``AttentionInterface.register`` / ``AttentionMaskInterface.register`` --
   ``test_attention_switch_and_registry``
8. (not in ``fast``) a GGUF model saved without its quantizer (``models.loading.convert_gguf``) --
   ``model.hf_quantizer``, set by a GGUF load and read by ``save_pretrained`` and the Trainer --
   ``test_gguf_quantizer_marker``, ``test_gguf_model_saves_without_its_quantizer``
9. LM head only at scored positions (``logits_mask``, ``head_loss``) -- a 2-D boolean
   ``logits_to_keep`` in the causal LMs' forward -- ``test_boolean_logits_to_keep``
10. freed memory kept in the process, and handed back once after the model is prepared
    (``memory``) -- glibc's ``mallopt`` (M_MMAP_MAX, M_TRIM_THRESHOLD) and ``malloc_trim`` --
    ``test_glibc_mallopt``, ``test_glibc_malloc_trim_returns_freed_heap_pages``
11. LoRA dropout from a list of dropped positions (``dropout``, called by ``addmm``) -- PEFT's
    ``lora_dropout[adapter]``: an ``nn.Dropout`` whose ``p`` and ``training`` are the dropout's,
    applied by the variant (not by ``lora.Linear``) when a ``lora_variant`` is installed --
    ``test_peft_lora_dropout_module``
12. PyTorch's CPU blocks page-aligned, the large ones advised for huge pages (``memory``) --
    PyTorch's ``THP_MEM_ALLOC_ENABLE``, read by c10's ``alloc_cpu`` at the first allocation --
    ``test_torch_thp_mem_alloc_enable``. The one patch outside the switch: it must be set before
    torch is imported, so the ``oloraplus`` command sets it before parsing any flag
    (``THP_MEM_ALLOC_ENABLE=0`` in the environment opts out).

Patch 8 is not a speed patch and stays in ``models`` (a lower layer): without it a converted
GGUF model could not be saved as a plain checkpoint or trained, so it runs with the switch off too.
"""
