"""Method names: the paper's display labels (tables, plots) and their ASCII file-name form.

Read from the method registry (stage2/methods/: each method module declares its
name, label and sweep variants). Shared by the CLI and the demo (the demo must
not import the CLI module); importing it loads no torch.
"""
from __future__ import annotations

import re

from .methods import METHODS, SWEEP_VARIANTS
from .methods.viker import METHOD as _VIKER

# Display label of every sweep key: train.method's names and the variants (viker+nll: ViKeR+NLL).
METHOD_LABELS = {**{name: m.label for name, m in METHODS.items()},
                 **{key: v.label for key, v in SWEEP_VARIANTS.items()}}


def train_method(key: str) -> tuple[str, dict]:
    """(train.method, extra train settings) of a sweep method key ('viker+nll' -> viker, retain_term nll)."""
    key = key.strip().lower()
    if key in SWEEP_VARIANTS:
        variant = SWEEP_VARIANTS[key]
        return variant.method, dict(variant.settings)
    return key, {}


def reference_overrides(key: str) -> dict:
    """The precompute settings a sweep key's cache is made with ('viker+span' -> span chain); {} for the default."""
    variant = SWEEP_VARIANTS.get(key.strip().lower())
    return dict(variant.reference) if variant else {}


def is_viker(key: str) -> bool:
    """Whether a sweep key trains ViKeR (its lambda is swept)."""
    return train_method(key)[0] == _VIKER.name


def method_label(info: dict) -> str:
    """The paper's name of a training run's method, ablations included (Method.run_label)."""
    name = info.get("method", "")
    method = METHODS.get(name)
    if method is None:
        return METHOD_LABELS.get(name, info.get("method", "adapter"))
    return method.run_label(info.get("train", {}), info.get("cache_settings") or {})


def file_slug(label: str) -> str:
    """A display label as a file-name part: ASCII, no spaces ('ViKeR λ=0.5' -> 'viker-lam0.5')."""
    text = label.replace("λ=", "lam").replace("λ", "lam").replace("w/o", "wo").lower()
    return re.sub(r"[^a-z0-9._]+", "-", text).strip("-") or "run"
