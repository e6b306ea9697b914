"""The methods: their names, what each needs, and the loss each one computes on a micro-batch.

DESIGN.md section 5; the loss functions themselves are in losses.py, with plain
tensor arguments:

    ga        gradient ascent on the forget answers       (= ViKeR "w/o Reg")
    graddiff  ga + alpha * NLL(retain)
    kl_min    ga + KL(vanilla || current) on retain
    npo       NPO against the cached own-image log-likelihood
    idkpo     DPO towards "I don't know" with cached reference log-likelihoods
    viker     ga + lambda * D(R, Q) against the cached reference distribution R
              (use_ga=False: "w/o GA"; a cache made with reference=own: "w/o Vis";
              train.retain_term nll | kl: ViKeR+NLL, ViKeR+KL)

The frozen model is never a second copy: it is the base with the adapter
disabled, under no_grad. With `online_reference` ViKeR computes R during
training (k frozen forwards per sample, drawn exactly like stage one draws
them); it exists to measure what the cache saves and to check that both paths
give the same loss.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from pipeline.config import TrainConfig
from pipeline.models.forward import TextBatch, answer_logits, make_text_batch
from pipeline.stage1.precompute import summarise
from pipeline.stage1.references import draw_reference_images

from .errors import TrainError
from .inputs import Example, Inputs
from .losses import (DIVERGENCES, LOSS_CONVENTIONS, entropy_token_lambda, ga_loss, idkpo_loss, idkpo_scale,
                     kl_retain_loss, nll_loss, npo_loss, per_token, retain_nll_weight, sequence_logprob, viker_loss)
from .stream import MicroBatch, Refs


METHODS = ("ga", "graddiff", "kl_min", "npo", "idkpo", "viker")


def resolve_method(name: str) -> str:
    method = str(name).strip().lower().replace("-", "_")
    if method not in METHODS:
        raise TrainError(f"unknown training method {name!r}; choose one of: {', '.join(METHODS)}")
    return method


def needs_retain(method: str, retain_weight: float, retain_term: str = "none") -> bool:
    return method in ("graddiff", "kl_min") or retain_weight > 0 or retain_term != "none"


def needs_cache(method: str, spec) -> bool:
    return method in ("npo", "idkpo") or (method == "viker" and not spec.online)


RETAIN_TERMS = ("none", "nll", "kl")


def check_retain_term(term: str, method: str) -> str:
    """train.retain_term, checked: ViKeR's retain-aware variants (none is the paper's loss)."""
    name = str(term).strip().lower()
    if name not in RETAIN_TERMS:
        raise TrainError(f"train.retain_term {term!r} is not one of: {', '.join(RETAIN_TERMS)}")
    if name != "none" and method != "viker":
        raise TrainError(f"train.retain_term applies to viker only (graddiff and kl_min are {method}'s "
                         f"retain-aware forms); got retain_term={name} with method {method}")
    return name


@dataclass
class LossSpec:
    """The loss hyper-parameters as plain values (the config is flattened here, at the edge)."""
    method: str
    lam: float = 0.5
    regulariser: str = "kl"
    use_ga: bool = True
    token_lambda: bool = False
    beta: float = 0.4
    retain_weight: float = 0.0
    retain_term: str = "none"      # ViKeR's optional retain term: none (the paper's) | nll | kl
    online: bool = False
    convention: str = "viker"      # losses.LOSS_CONVENTIONS: how NPO / IdkPO / KL_Min are written
    idk_beta: float = 0.1          # IdkPO's beta under the mllmu / openunlearning conventions
    k: int = 5
    top_k: int = 64
    ref_seed: int = 0


def loss_spec(cfg: TrainConfig, method: str, k: int, top_k: int, ref_seed: int) -> LossSpec:
    convention = str(cfg.convention).strip().lower()
    if convention not in LOSS_CONVENTIONS:
        raise TrainError(f"train.convention {cfg.convention!r} is not one of: {', '.join(LOSS_CONVENTIONS)}")
    return LossSpec(method=method, lam=cfg.lam, regulariser=cfg.regulariser.lower(), use_ga=cfg.use_ga,
                    token_lambda=cfg.token_lambda, beta=cfg.beta, retain_weight=cfg.retain_weight,
                    retain_term=check_retain_term(cfg.retain_term, method),
                    online=cfg.online_reference and method == "viker", k=k, top_k=top_k, ref_seed=ref_seed,
                    convention=convention, idk_beta=cfg.idk_beta)


def check_options(cfg: TrainConfig, method: str, cache_dir, pool_dir) -> None:
    if cfg.regulariser.lower() not in DIVERGENCES:
        raise TrainError(f"train.regulariser {cfg.regulariser!r} is not one of: {', '.join(DIVERGENCES)}")
    if cfg.online_reference and method != "viker":
        raise TrainError(f"train.online_reference applies to viker only, not {method}")
    if cfg.online_reference and not pool_dir:
        raise TrainError("online ViKeR needs the reference pool directory (pool_dir)")
    if (method in ("npo", "idkpo") or (method == "viker" and not cfg.online_reference)) and not cache_dir:
        raise TrainError(f"method {method} needs a reference cache: run viker precompute first")
    for name in ("batch_size", "grad_accum"):
        if getattr(cfg, name) < 1:
            raise TrainError(f"train.{name} must be >= 1, got {getattr(cfg, name)}")
    if not cfg.output:
        raise TrainError("train.output is empty: name the run's output directory")
    if cfg.steps <= 0 and cfg.epochs <= 0:
        raise TrainError("set train.steps > 0 or train.epochs > 0")


class AnswerLogits(torch.nn.Module):
    """answer_logits as a module, so DDP sees (and synchronises) the gradient forward."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, answer_pos, pixel_values):
        # answer_logits reads only these three fields of the batch.
        batch = TextBatch(input_ids, attention_mask, answer_pos, answer_ids=None, answer_mask=None)
        return answer_logits(self.model, batch, pixel_values)


@contextlib.contextmanager
def frozen(model):
    """The vanilla model: adapter off, no grad, eval mode (no dropout draws, so no RNG is consumed)."""
    was_training = model.training
    model.eval()
    try:
        with model.disable_adapter(), torch.no_grad():
            yield model
    finally:
        model.train(was_training)


def frozen_dtype(model) -> torch.dtype:
    return next(p.dtype for p in model.parameters() if not p.requires_grad)


def forward_parts(net, model, parts: dict[str, list[Example]], inputs: Inputs, dev):
    """One gradient forward over every part (forget, idk, retain) concatenated.

    One call, not one per part: DDP synchronises one forward per backward, and
    one larger batch is faster. Returns name -> (logits, answer ids, mask),
    each sliced back to that part's own answer width.
    """
    examples = [ex for part in parts.values() for ex in part]
    batch = make_text_batch([ex.ids for ex in examples], [ex.start for ex in examples], inputs.pad_id).to(dev)
    pixels = inputs.bank[[ex.image for ex in examples]].to(dev, frozen_dtype(model))
    logits = net(batch.input_ids, batch.attention_mask, batch.answer_pos, pixels)
    out, row = {}, 0
    for name, part in parts.items():
        width = max(len(ex.ids) - ex.start for ex in part)
        rows = slice(row, row + len(part))
        out[name] = (logits[rows, :width], batch.answer_ids[rows, :width], batch.answer_mask[rows, :width])
        row += len(part)
    return out


def frozen_logits(model, examples: list[Example], inputs: Inputs, dev, images=None):
    """Vanilla-model answer logits; `images` overrides the examples' own image rows (pool pixels)."""
    batch = make_text_batch([ex.ids for ex in examples], [ex.start for ex in examples], inputs.pad_id).to(dev)
    pixels = images if images is not None else inputs.bank[[ex.image for ex in examples]]
    with frozen(model):
        return answer_logits(model, batch, pixels.to(dev, frozen_dtype(model))), batch


def online_references(model, examples: list[Example], inputs: Inputs, spec: LossSpec, dev) -> Refs:
    """R for a micro-batch during training: k frozen forwards per sample, averaged like stage one.

    Top-K probabilities are rounded to float16 as the cache stores them, so the
    online and cached paths train on the same numbers.
    """
    k = spec.k
    repeated = [ex for ex in examples for _ in range(k)]
    picks = [j for ex in examples for j in draw_reference_images(ex.sample_id, len(inputs.pool), k, spec.ref_seed)]
    logits, batch = frozen_logits(model, repeated, inputs, dev, images=inputs.pool[picks])
    B, T = len(examples), logits.shape[1]
    avg = torch.softmax(logits.float(), dim=-1).view(B, k, T, -1).mean(1)
    idx, prob, tail, entropy = summarise(avg, spec.top_k)
    mask = batch.answer_mask.view(B, k, T)[:, 0] > 0
    prob = prob.half().float()
    return Refs(torch.where(mask[..., None], idx, 0), torch.where(mask[..., None], prob, 0.0),
                torch.where(mask, tail, 1.0), torch.where(mask, entropy, 0.0))


def micro_batch_loss(net, model, mb: MicroBatch, spec: LossSpec, inputs: Inputs, dev):
    """(scalar loss for this micro-batch, per-example diagnostics named forget/... and retain/...)."""
    method = spec.method
    # Frozen-model targets first: the gradient forward's activations are not alive during them.
    refs = vanilla = None
    if method == "viker":
        refs = online_references(model, mb.forget, inputs, spec, dev) if spec.online else mb.refs.to(dev)
    kl_retain = method == "kl_min" or spec.retain_term == "kl"
    if kl_retain:
        vanilla, _ = frozen_logits(model, mb.retain, inputs, dev)
    parts = {"forget": mb.forget}
    if method == "idkpo":
        parts["idk"] = mb.idk
    if mb.retain:
        parts["retain"] = mb.retain
    out = forward_parts(net, model, parts, inputs, dev)
    logits, labels, mask = out["forget"]

    if method == "viker":
        lam_t = entropy_token_lambda(refs.entropy, mask, spec.lam) if spec.token_lambda else None
        forget, d = viker_loss(logits, labels, mask, refs.topk_idx, refs.topk_prob, refs.tail_mass, spec.lam,
                               kind=spec.regulariser, use_ga=spec.use_ga, token_lambda=lam_t)
    elif method == "npo":
        ll_cur, ll_ref = sequence_logprob(logits, labels, mask), mb.ref_logp_own.to(dev)
        if spec.convention == "mllmu":      # per-token mean log-ratio (losses.LOSS_CONVENTIONS)
            ll_cur, ll_ref = per_token(ll_cur, mask), per_token(ll_ref, mask)
        forget, d = npo_loss(ll_cur, ll_ref, spec.beta)
    elif method == "idkpo":
        idk_logits, idk_labels, idk_mask = out["idk"]
        beta, scale = idkpo_scale(spec.convention, spec.beta, spec.idk_beta)
        forget, d = idkpo_loss(sequence_logprob(idk_logits, idk_labels, idk_mask), mb.ref_logp_idk.to(dev),
                               sequence_logprob(logits, labels, mask), mb.ref_logp_own.to(dev), beta, scale=scale)
    else:
        forget, d = ga_loss(logits, labels, mask)
    total = forget.mean()
    diags = {"forget/loss": forget, **{"forget/" + _short(k, "forget_"): v for k, v in d.items()}}

    if "retain" in out:
        r_logits, r_labels, r_mask = out["retain"]
        if kl_retain:
            kl, d = kl_retain_loss(r_logits, vanilla, r_mask)
            # KL_Min's KL has weight 1; ViKeR+KL weighs it like ViKeR+NLL's NLL (alpha, 1 when unset).
            kl_weight = (spec.retain_weight or 1.0) if spec.retain_term == "kl" else 1.0
            total = total + kl_weight * kl.mean()
            diags.update({"retain/" + _short(k, "retain_"): v for k, v in d.items()})
        weight = spec.retain_weight or retain_nll_weight(spec.convention, method, spec.retain_term)
        if spec.retain_term == "kl":
            weight = 0.0              # retain_weight is the KL's alpha here, not an added NLL
        if weight > 0:
            nll, d = nll_loss(r_logits, r_labels, r_mask)
            total = total + weight * nll.mean()
            diags.update({"retain/" + _short(k, "retain_"): v for k, v in d.items()})
    return total, diags


def _short(name: str, prefix: str) -> str:
    return name[len(prefix):] if name.startswith(prefix) else name
