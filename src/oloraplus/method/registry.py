"""The methods oloraplus trains, declared once.

A method is an adapter initialisation plus an optimiser rule: one learning rate for A and B, or
LoRA+'s two (``lr_B = ratio * lr_A``). Every ``-plus`` method has a single-rate *family* method it
reduces to at ratio 1 (``olora-plus`` at ratio 1 is ``olora``). CLI choices, grids, reports and
results derive their method names, inits and titles from :data:`METHODS`; nothing else parses
method names.

Adding an init method: one :class:`Method` entry per optimiser rule here, and its init function in
``method/adapters.py`` (see docs/architecture.md).
"""

from __future__ import annotations

from dataclasses import dataclass

from oloraplus.errors import UserError


@dataclass(frozen=True)
class Method:
    """One trainable method.

    ``init`` names the adapter initialisation (``method.adapters.INITS``); ``takes_ratio`` is True
    for LoRA+ methods (two learning rates, ``--ratio`` required) and False for single-rate ones;
    ``family`` is the single-rate method of the same init; ``title`` is the family's display name.
    """

    name: str
    init: str
    takes_ratio: bool
    family: str
    title: str

    @property
    def label(self) -> str:
        """Display name: "OLoRA", "OLoRA+"."""
        return self.title + ("+" if self.takes_ratio else "")


def _pair(family: str, init: str, title: str) -> tuple[Method, Method]:
    return Method(family, init, False, family, title), Method(f"{family}-plus", init, True, family, title)


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        *_pair("lora", "lora", "LoRA"),
        *_pair("olora", "olora", "OLoRA"),
        *_pair("pissa", "pissa", "PiSSA"),
    )
}
FAMILIES: tuple[str, ...] = tuple(dict.fromkeys(m.family for m in METHODS.values()))


def get_method(name: str) -> Method:
    """The registry entry of ``name``; a :class:`UserError` naming the choices otherwise."""
    try:
        return METHODS[name]
    except KeyError:
        raise UserError(f"unknown method '{name}': choose one of {', '.join(METHODS)}") from None


def plus_method(family: str) -> Method:
    """The LoRA+ (two-rate) method of a family: ``olora`` -> ``olora-plus``."""
    return next(m for m in METHODS.values() if m.family == family and m.takes_ratio)
