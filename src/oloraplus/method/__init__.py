"""The method: the adapter inits (OLoRA, PiSSA) and ``apply_adapters`` (alias ``apply_olora``), LoRA+
optimiser groups, the Trainer, the method registry and the export to standard LoRA.

Usable on its own in any Trainer/TRL script: it imports nothing from ``training``, ``experiments``
or ``analysis``.
"""
