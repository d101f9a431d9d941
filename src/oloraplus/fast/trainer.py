"""Speed patches of the Trainer: tighter length grouping and the attention kernel chosen per batch.

:class:`FastTrainerMixin` goes before a ``transformers.Trainer`` subclass in the bases
(``training.recipe.RecipeTrainer`` is ``FastTrainerMixin`` + ``OLoRAPlusTrainer``). It overrides
the Trainer's private ``_get_train_sampler`` (to return ``data.LengthGroupedSampler``) and switches
the model's attention implementation per batch (``PreTrainedModel.set_attn_implementation``, with
our kernel registered through ``AttentionInterface``, ``fast.attention``). Without the mixin the
Trainer samples as it does itself and the model keeps the kernel it was loaded with.
"""

from __future__ import annotations

from oloraplus.data.batching import ExampleDataset, LengthGroupedSampler
from oloraplus.fast.attention import attention_kernel, current_attention, use_attention


class FastTrainerMixin:
    """Trainer mixin: ``data.LengthGroupedSampler`` for ``group_by_length`` on an ``ExampleDataset``,
    and the attention kernel chosen per batch length (``fast.attention.attention_kernel``).

    Set ``attention`` (a ``fast.attention.ATTENTIONS`` choice) and ``device_kind`` after
    construction. After ``train`` the model runs its own attention kernel again, so evaluation is
    unchanged.
    """

    attention: str = "auto"
    device_kind: str = "cpu"

    def compute_loss(self, model, inputs, *args, **kwargs):
        use_attention(self.model, attention_kernel(self.attention, self.device_kind, inputs["input_ids"].shape[1]))
        return super().compute_loss(model, inputs, *args, **kwargs)

    def train(self, *args, **kwargs):
        """Train; afterwards the model has its own attention kernel again (evaluation is unchanged)."""
        original = current_attention(self.model)
        try:
            return super().train(*args, **kwargs)
        finally:
            use_attention(self.model, original)

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.args.train_sampling_strategy != "group_by_length" or not isinstance(dataset, ExampleDataset):
            return super()._get_train_sampler(train_dataset)
        global_batch = self.args.per_device_train_batch_size * self.args.world_size
        return LengthGroupedSampler([len(e.input_ids) for e in dataset.examples], global_batch, self.args.seed)
