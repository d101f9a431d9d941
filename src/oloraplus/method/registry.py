"""The methods ``oloraplus`` trains, declared once: the init each one uses and whether it takes a ratio."""

from __future__ import annotations

METHODS = {  # method -> (init, takes a ratio)
    "lora": ("lora", False),
    "olora": ("olora", False),
    "lora-plus": ("lora", True),
    "olora-plus": ("olora", True),
}
