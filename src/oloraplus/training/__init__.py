"""The fine-tuning recipe behind ``oloraplus train`` / ``evaluate``: config, recipe, checkpoints,
provenance, distributed helpers and the device/precision runtime.

Depends on ``method``, ``fast``, ``data``, ``models``, ``evaluation`` and (for ``--track-dynamics``) ``analysis``.
"""
