"""OLoRA init and LoRA+ groups inside TRL's ``SFTTrainer`` (the optional ``trl`` extra).

``OLoRAPlusSFTTrainer`` is ``trl.SFTTrainer`` with
:class:`~oloraplus.method.trainer.LoRAPlusOptimizerMixin`: the optimiser is built in
``create_optimizer()`` as in :class:`~oloraplus.method.trainer.OLoRAPlusTrainer`, so ``lora_B``
trains at ``ratio * args.learning_rate``. Give the adapter as ``olora=OLoRAPlusConfig(...)``
(applied with :func:`~oloraplus.method.adapters.apply_adapters` before TRL sees the model) or
pass a model that ``apply_olora`` already wrapped; not ``peft_config=``, with which TRL would add
plain LoRA adapters::

    from oloraplus.method.adapters import OLoRAPlusConfig
    from oloraplus.method.trl import OLoRAPlusSFTTrainer
    from trl import SFTConfig

    trainer = OLoRAPlusSFTTrainer(model=model, args=SFTConfig(output_dir="out", learning_rate=3e-4),
                                  train_dataset=dataset, processing_class=tokenizer,
                                  olora=OLoRAPlusConfig(rank=32, alpha=16), ratio=16)
    trainer.train()

TRL is imported only when ``OLoRAPlusSFTTrainer`` is first used; without it that raises
:class:`~oloraplus.errors.UserError` saying how to install it (``pip install 'oloraplus[trl]'``).
"""

from __future__ import annotations

from oloraplus.errors import UserError

__all__ = ["OLoRAPlusSFTTrainer"]  # noqa: F822 (built on first access, see __getattr__)


def __getattr__(name: str):
    if name == "OLoRAPlusSFTTrainer":
        cls = _build_sft_trainer()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _build_sft_trainer() -> type:
    try:
        from trl import SFTTrainer
    except ImportError as exc:
        raise UserError("OLoRAPlusSFTTrainer needs TRL, which is not installed: pip install 'oloraplus[trl]'") from exc

    from oloraplus.method.adapters import OLoRAPlusConfig, apply_adapters
    from oloraplus.method.trainer import LoRAPlusOptimizerMixin

    class OLoRAPlusSFTTrainer(LoRAPlusOptimizerMixin, SFTTrainer):
        """``trl.SFTTrainer`` with the OLoRA+ adapter init (``olora=``) and LoRA+ groups (``ratio=``).

        ``ratio`` is resolved as in :class:`~oloraplus.method.trainer.OLoRAPlusTrainer` (this
        constructor, ``args.ratio`` if the arguments have one, the model's ``OLoRAPlusConfig``).
        """

        ratio_source = "OLoRAPlusSFTTrainer"

        def __init__(self, model, *args, olora: OLoRAPlusConfig | None = None, ratio: float | None = None,
                     **kwargs):
            if olora is not None:
                if kwargs.get("peft_config") is not None:
                    raise UserError("give OLoRAPlusSFTTrainer either olora= or peft_config=, not both "
                                    "(peft_config adds plain LoRA adapters)")
                if isinstance(model, str):
                    raise UserError("olora= needs a loaded model, not a name: load it with "
                                    "AutoModelForCausalLM.from_pretrained first")
                model = apply_adapters(model, olora)
            super().__init__(model, *args, ratio=ratio, **kwargs)

    OLoRAPlusSFTTrainer.__module__ = __name__
    return OLoRAPlusSFTTrainer
