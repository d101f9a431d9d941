"""An *arm* of a comparison: a method at one ratio lambda, with its label and sort order."""

from __future__ import annotations

from dataclasses import dataclass

from oloraplus.method.registry import FAMILIES, METHODS


def ratio_text(ratio: float) -> str:
    """16 -> "16", 0.0625 -> "1/16", 0.3 -> "0.3", a tuned 0.14748213081272676 -> "0.1475" (4 digits)."""
    ratio = float(ratio)
    if ratio.is_integer():
        return str(int(ratio))
    if ratio < 1 and (1 / ratio).is_integer():
        return f"1/{int(1 / ratio)}"
    return f"{ratio:.4g}"


def method_family(method: str) -> str:
    """The single-rate method of ``method``'s family (a name the registry does not know is its own family)."""
    return METHODS[method].family if method in METHODS else method


def family_title(family: str) -> str:
    return METHODS[family].title if family in METHODS else family


def takes_ratio(method: str) -> bool:
    return METHODS[method].takes_ratio if method in METHODS else False


@dataclass(frozen=True, order=True)
class Arm:
    """A method at one ratio; sorts baselines first, then by family and ratio."""

    sort_key: tuple
    method: str
    ratio: float

    @classmethod
    def of(cls, method: str, ratio: float) -> "Arm":
        family = method_family(method)
        rank = FAMILIES.index(family) if family in FAMILIES else len(FAMILIES)
        plus = takes_ratio(method)
        return cls((plus, rank, family, float(ratio), method), method, float(ratio))

    @property
    def is_baseline(self) -> bool:
        return not takes_ratio(self.method)

    @property
    def baseline(self) -> "Arm":
        return Arm.of(method_family(self.method), 1.0)

    @property
    def label(self) -> str:
        title = family_title(method_family(self.method))
        if self.is_baseline:
            return f"{title} baseline" if float(self.ratio) == 1 else f"{title} r={ratio_text(self.ratio)}"
        return f"{title}+ λ={ratio_text(self.ratio)}"

    @property
    def short(self) -> str:
        return "baseline" if self.is_baseline else f"λ={ratio_text(self.ratio)}"
