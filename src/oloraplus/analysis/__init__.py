"""How far trained adapters moved from their start: per-layer drift measures (``drift``) and the
Trainer callback that records them during training (``dynamics``)."""
