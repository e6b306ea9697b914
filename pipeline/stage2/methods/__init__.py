"""The unlearning methods: one module a method, and the registry that finds them.

    ga        gradient ascent on the forget answers       (= ViKeR "w/o Reg")
    graddiff  ga + alpha * NLL(retain)
    kl_min    ga + alpha * KL(vanilla || current) on retain
    npo       NPO against the cached own-image log-likelihood
    idkpo     DPO towards "I don't know" with cached reference log-likelihoods
    viker     ga + lambda * D(R, Q) against the cached reference distribution R
              (train.retain_term nll | kl: ViKeR+NLL, ViKeR+KL)
    simnpo    reference-free NPO on the per-token mean log-likelihood, with a margin
    rmu       a layer's forget hidden states pushed to c*u, its retain hidden states kept
    mmunlearner  graddiff's loss, its gradients masked to the weight rows a saliency score selects

Each module declares, in one class, the method's name and label, what it
needs (cache fields, idk answers, retain data), its defaults per loss
convention (its CONVENTIONS table, `base.Defaults`) and its forget loss on a
micro-batch, calling the tensor functions of losses.py; `base.Method` holds
what they share (the checks, the one gradient forward, the retain term) and
`forward` the forwards (the frozen model, online references). The formulas
and conventions are written out in docs/METHODS.md.

train.retain_weight has one meaning: alpha, the weight of the method's retain
term, whatever that term is (NLL for graddiff, simnpo, mmunlearner and viker+nll, KL for
kl_min and viker+kl, NLL+KL for kl_min under mllmu, the hidden-state distance
for rmu, an optional NLL for ga, npo, idkpo and plain viker); 0 means the
method's default under the convention.

ViKeR+NLL and ViKeR+KL live in viker.py, as `Variant`s of ViKeR (sweep keys,
not modules): they are train.method viker with train.retain_term set, the same
loss code with another retain term, and not train.method choices of their own.

The registry: every module of this package with a `METHOD` (a Method) is
registered, ordered by its `position`; adding a method touches only its module
(and its test). May import: the rest of `pipeline.stage2` but train, and what
stage two may import. Light at import (no torch): labels.py reads it for the CLI.
"""
from __future__ import annotations

import importlib
import pkgutil

from ..errors import TrainError
from .base import (CACHE_FIELDS, IDK, IDK_LOGP, LOSS_CONVENTIONS, OWN_LOGP, REFS, RETAIN, RETAIN_TERMS, SCORES,
                   Defaults, LossSpec, Method, Variant)

__all__ = ["CACHE_FIELDS", "IDK", "IDK_LOGP", "LOSS_CONVENTIONS", "METHODS", "METHOD_NAMES", "OWN_LOGP", "REFS",
           "RETAIN", "RETAIN_TERMS", "SCORES", "SWEEP_KEYS", "SWEEP_VARIANTS", "AnswerLogits", "Defaults",
           "LossSpec", "Method", "Variant", "check_options", "check_retain_term", "forward_parts", "frozen",
           "frozen_dtype", "frozen_logits", "get_method", "loss_spec", "micro_batch_loss", "online_references",
           "resolve_method"]


def _discover() -> dict[str, Method]:
    found = []
    for info in pkgutil.iter_modules(__path__):
        if info.name in ("base", "forward"):
            continue
        method = getattr(importlib.import_module(f"{__name__}.{info.name}"), "METHOD", None)
        if isinstance(method, Method):
            found.append(method)
    return {m.name: m for m in sorted(found, key=lambda m: m.position)}


METHODS: dict[str, Method] = _discover()
METHOD_NAMES: tuple[str, ...] = tuple(METHODS)          # train.method's choices
# Sweep keys beyond train.method (demo.methods, study.methods): a method with extra train settings.
SWEEP_VARIANTS: dict[str, Variant] = {v.key: v for m in METHODS.values() for v in m.variants}
SWEEP_KEYS: tuple[str, ...] = METHOD_NAMES + tuple(SWEEP_VARIANTS)


def get_method(name) -> Method:
    """The registered method called `name` (any case, '-' for '_'); TrainError naming the known ones."""
    key = str(name).strip().lower().replace("-", "_")
    if key not in METHODS:
        raise TrainError(f"unknown training method {name!r}; choose one of: {', '.join(METHOD_NAMES)}")
    return METHODS[key]


def resolve_method(name: str) -> str:
    return get_method(name).name


def check_retain_term(term: str, method: str) -> str:
    """train.retain_term, checked: ViKeR's retain-aware variants (none is the paper's loss)."""
    name = str(term).strip().lower()
    if name not in RETAIN_TERMS:
        raise TrainError(f"train.retain_term {term!r} is not one of: {', '.join(RETAIN_TERMS)}")
    m = get_method(method)
    if name not in m.retain_term_choices:
        takers = [n for n, other in METHODS.items() if name in other.retain_term_choices]
        raise TrainError(f"train.retain_term applies to {', '.join(takers)} only; {m.name}'s retain term is "
                         f"weighted by train.retain_weight alone (got retain_term={name} with method {m.name})")
    return name


def loss_spec(cfg, method: str, k: int, top_k: int, ref_seed: int, span: str = "none") -> LossSpec:
    """The config's train section (a TrainConfig) as the plain LossSpec of `method`."""
    m = get_method(method)
    convention = str(cfg.convention).strip().lower()
    if convention not in LOSS_CONVENTIONS:
        raise TrainError(f"train.convention {cfg.convention!r} is not one of: {', '.join(LOSS_CONVENTIONS)}")
    return LossSpec(method=m.name, lam=cfg.lam, regulariser=cfg.regulariser.lower(), use_ga=cfg.use_ga,
                    token_lambda=cfg.token_lambda, beta=cfg.beta, retain_weight=cfg.retain_weight,
                    retain_term=check_retain_term(cfg.retain_term, m.name),
                    online=cfg.online_reference and m.online_reference, k=k, top_k=top_k, ref_seed=ref_seed, span=span,
                    convention=convention, idk_beta=cfg.idk_beta, simnpo_gamma=cfg.simnpo_gamma,
                    rmu_layer=cfg.rmu_layer, rmu_steering=cfg.rmu_steering, mmu_threshold=cfg.mmu_threshold,
                    mmu_mask_samples=cfg.mmu_mask_samples, seed=cfg.seed)


def check_options(cfg, method: str, cache_dir, pool_dir) -> None:
    from ..losses import DIVERGENCES
    m = get_method(method)
    if cfg.regulariser.lower() not in DIVERGENCES:
        raise TrainError(f"train.regulariser {cfg.regulariser!r} is not one of: {', '.join(DIVERGENCES)}")
    if cfg.online_reference and not m.online_reference:
        takers = [n for n, other in METHODS.items() if other.online_reference]
        raise TrainError(f"train.online_reference applies to {', '.join(takers)} only, not {m.name}")
    if cfg.online_reference and not pool_dir:
        raise TrainError(f"online {m.label} needs the reference pool directory (pool_dir)")
    if m.uses_cache(LossSpec(m.name, online=bool(cfg.online_reference))) and not cache_dir:
        raise TrainError(f"method {m.name} needs a reference cache: run viker precompute first")
    for name in ("batch_size", "grad_accum"):
        if getattr(cfg, name) < 1:
            raise TrainError(f"train.{name} must be >= 1, got {getattr(cfg, name)}")
    if not cfg.output:
        raise TrainError("train.output is empty: name the run's output directory")
    if cfg.steps <= 0 and cfg.epochs <= 0:
        raise TrainError("set train.steps > 0 or train.epochs > 0")


def micro_batch_loss(net, model, mb, spec: LossSpec, inputs, dev):
    """(scalar loss for this micro-batch, per-example diagnostics named forget/... and retain/...)."""
    return get_method(spec.method).loss(net, model, mb, spec, inputs, dev)


# The shared forwards (forward.py) import torch: loaded on first use, so the registry stays light.
_FORWARD = ("AnswerLogits", "forward_parts", "frozen", "frozen_dtype", "frozen_logits", "online_references")


def __getattr__(name: str):
    if name in _FORWARD:
        from . import forward
        return getattr(forward, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
