"""Method names: the paper's display labels (tables, plots) and their ASCII file-name form.

Shared by the CLI and the demo (the demo must not import the CLI module).
"""
from __future__ import annotations

import re

METHOD_LABELS = {"ga": "GA", "graddiff": "GradDiff", "kl_min": "KL_Min", "npo": "NPO", "idkpo": "IdkPO",
                 "viker": "ViKeR", "viker+nll": "ViKeR+NLL", "viker+kl": "ViKeR+KL"}
# Sweep method keys beyond train.method (demo.methods, study.methods): ViKeR with a retain term
# (train.retain_term; ours), compared as methods of their own.
RETAIN_AWARE = {"viker+nll": "nll", "viker+kl": "kl"}


def train_method(key: str) -> tuple[str, dict]:
    """(train.method, extra train settings) of a sweep method key ('viker+nll' -> viker, retain_term nll)."""
    key = key.strip().lower()
    if key in RETAIN_AWARE:
        return "viker", {"retain_term": RETAIN_AWARE[key]}
    return key, {}


def is_viker(key: str) -> bool:
    return train_method(key)[0] == "viker"


def method_label(info: dict) -> str:
    """The paper's name of a training run's method, ablations included."""
    t = info.get("train", {})
    label = METHOD_LABELS.get(info.get("method", ""), info.get("method", "adapter"))
    if info.get("method") == "viker":
        if not t.get("use_ga", True):
            label += " w/o GA"
        if (info.get("cache_settings") or {}).get("reference") == "own":
            label += " w/o Vis"
        if t.get("regulariser", "kl") != "kl":
            label += f" ({t['regulariser'].upper()})"
        if t.get("retain_term", "none") != "none":
            label += f"+{t['retain_term'].upper()}"
    return label


def file_slug(label: str) -> str:
    """A display label as a file-name part: ASCII, no spaces ('ViKeR λ=0.5' -> 'viker-lam0.5')."""
    text = label.replace("λ=", "lam").replace("λ", "lam").replace("w/o", "wo").lower()
    return re.sub(r"[^a-z0-9._]+", "-", text).strip("-") or "run"
