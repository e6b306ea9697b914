"""What a method declares (`Method`), the loss settings it reads (`LossSpec`) and the loop it shares.

Light on purpose: no torch at import. labels.py, and through it the CLI, reads
the registry's names and labels; the loss code imports torch, losses.py and
forward.py inside the functions that compute.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import TrainError

# train.convention: how the baselines' losses are written (docs/METHODS.md). Each method
# module holds one Defaults per convention in its CONVENTIONS table.
LOSS_CONVENTIONS = ("viker", "mllmu", "openunlearning")

# train.retain_term: ViKeR's optional retain term (none is the paper's loss).
RETAIN_TERMS = ("none", "nll", "kl")

# What a method's loss may read beside the forget examples, named as the MicroBatch fields
# (stream.MicroBatch) that carry them. The first three come from stage one's cache.
REFS = "refs"                  # the reference distributions R: top-K, tail, entropy (stream.Refs)
OWN_LOGP = "ref_logp_own"      # the vanilla log-likelihood of the answer with the sample's own image
IDK_LOGP = "ref_logp_idk"      # the vanilla log-likelihood of the idk answer
CACHE_FIELDS = (REFS, OWN_LOGP, IDK_LOGP)
SCORES = (OWN_LOGP, IDK_LOGP)  # per-sample cache columns a cache may lack (precompute.scores)
IDK = "idk"                    # the forget questions answered with the idk answer
RETAIN = "retain"              # retain examples


@dataclass
class LossSpec:
    """The loss hyper-parameters as plain values (the config is flattened here, at the edge)."""
    method: str
    lam: float = 0.5
    regulariser: str = "kl"
    use_ga: bool = True
    token_lambda: bool = False
    beta: float = 0.0              # NPO's and SimNPO's (IdkPO's under viker) beta; 0: the convention's default
    retain_weight: float = 0.0     # alpha of the method's retain term; 0: the method's default (Method.retain_terms)
    retain_term: str = "none"      # ViKeR's optional retain term: none (the paper's) | nll | kl
    online: bool = False
    convention: str = "viker"      # LOSS_CONVENTIONS: how NPO / IdkPO / KL_Min are written
    idk_beta: float = 0.1          # IdkPO's beta under the mllmu / openunlearning conventions
    simnpo_gamma: float = 0.0      # SimNPO's margin, per-token NLL units
    rmu_layer: int = -1            # RMU's decoder layer; -1: the middle one
    rmu_steering: float = 2.0      # RMU's steering coefficient c
    mmu_threshold: float = 1.0     # MMUnlearner: a weight row trains when forget / retain Fisher >= this
    mmu_mask_samples: int = 0      # MMUnlearner: forget and retain samples (each) scored for the mask; 0: all
    seed: int = 0                  # train.seed: RMU's random direction u
    k: int = 5
    top_k: int = 64
    ref_seed: int = 0
    span: str = "none"             # precompute.span of online references: none | chain (stage1/spans.py)


@dataclass(frozen=True)
class Defaults:
    """A method's settings under one loss convention.

    `retain_weight`: alpha when train.retain_weight is 0 (0: no retain term, and no retain data read).
    `retain`: the retain loss(es) alpha weighs, added in this order: "nll" (mean NLL of the retain
    answers) and/or "kl" (KL(P_vanilla || P_cur) on them), or "hidden": the distance of a layer's retain
    hidden states to the vanilla model's (RMU's, whose `loss` makes those states; rmu.py). Method modules
    extend this with their own fields.
    """
    retain_weight: float = 0.0
    retain: tuple[str, ...] = ("nll",)


def every_convention(defaults: Defaults, **overrides: Defaults) -> dict[str, Defaults]:
    """A CONVENTIONS table: `defaults` under each convention, except those named in `overrides`."""
    return {c: overrides.get(c, defaults) for c in LOSS_CONVENTIONS}


@dataclass(frozen=True)
class Variant:
    """A sweep key beyond train.method (demo.methods, study.methods): `method` with extra train settings.

    `reference`: precompute settings its cache is made with (span, names); a
    variant with any needs a cache of its own (the study makes one per setting).
    """
    key: str
    label: str
    method: str
    settings: dict = field(default_factory=dict)
    reference: dict = field(default_factory=dict)


class Method:
    """One unlearning method: declared by a module of this package, found by the registry (__init__).

    A subclass sets the class attributes below and `forget_loss`; everything
    else (the checks, the frozen targets, the one gradient forward, the retain
    term) is shared here, so that the loop, the inputs and the stream ask a
    Method what it needs instead of comparing its name.
    """
    name: str = ""                      # train.method
    label: str = ""                     # the paper's display label (tables, plots)
    position: int = 0                   # place among train.method's choices, and in tables
    cache_fields: tuple[str, ...] = ()  # what the loss reads from stage one's cache (REFS, OWN_LOGP, IDK_LOGP)
    idk_answers: bool = False           # the loss reads the forget questions answered "I don't know" (IDK)
    online_reference: bool = False      # REFS can be computed during training instead (train.online_reference)
    retain_term_choices: tuple[str, ...] = ("none",)   # the train.retain_term values it accepts
    conventions: dict[str, Defaults] = {}              # LOSS_CONVENTIONS -> its Defaults
    variants: tuple[Variant, ...] = ()  # sweep keys that train this method with extra settings

    def __repr__(self) -> str:
        return f"<method {self.name}>"

    # ------------------------------------------------------------- needs

    def defaults(self, spec: LossSpec) -> Defaults:
        return self.conventions[spec.convention]

    def reads(self, spec: LossSpec) -> tuple[str, ...]:
        """The cache fields the loss reads under `spec` (none for online ViKeR: it computes R itself)."""
        return self.cache_fields

    @property
    def scores(self) -> tuple[str, ...]:
        """The per-sample cache columns (SCORES) every forget sample must carry."""
        return tuple(f for f in self.cache_fields if f in SCORES)

    def uses_cache(self, spec: LossSpec) -> bool:
        return bool(self.reads(spec))

    def retain_terms(self, spec: LossSpec) -> tuple[tuple[str, float], ...]:
        """((retain loss, alpha), ...): alpha = train.retain_weight, or the convention's default when it is 0."""
        defaults = self.defaults(spec)
        alpha = spec.retain_weight or defaults.retain_weight
        return tuple((term, alpha) for term in defaults.retain) if alpha > 0 else ()

    def needs_retain(self, spec: LossSpec) -> bool:
        return bool(self.retain_terms(spec))

    def needs(self, spec: LossSpec) -> tuple[str, ...]:
        """Every MicroBatch field the loss reads under `spec`, beside the forget examples."""
        return (self.reads(spec) + ((IDK,) if self.idk_answers else ())
                + ((RETAIN,) if self.needs_retain(spec) else ()))

    def check_batch(self, mb, spec: LossSpec) -> None:
        """Refuse a micro-batch that lacks a field the method declares (rather than fail inside the loss)."""
        missing = [name for name in self.needs(spec) if getattr(mb, name) is None or
                   (name in (IDK, RETAIN) and len(getattr(mb, name)) == 0)]
        if missing:
            raise TrainError(f"method {self.name} needs {', '.join(missing)} in every micro-batch; "
                             f"this one has none")

    # ------------------------------------------------------------- labels

    def run_label(self, train: dict, cache_settings: dict) -> str:
        """The display label of a run of this method (its train settings, its cache's settings)."""
        return self.label

    # ------------------------------------------------------------- the step

    def gradient_edit(self, model, inputs, spec: LossSpec, batch_size: int, dev, rank: int = 0, world: int = 1,
                      log=None):
        """Made once at setup, before the first step: None, or a callable that edits the step's gradients in
        place between the backward and the clipping, with a `summary` dict that train_config.json records.

        None for every method whose loss alone defines it; MMUnlearner's saliency mask is such an edit
        (mmunlearner.py). `model`: the peft model (its adapter off is the vanilla model); `inputs`: the run's
        Inputs; `log`: a print-like function on rank 0, else None.
        """
        return None

    # ------------------------------------------------------------- the loss

    def references(self, model, mb, spec: LossSpec, inputs, dev):
        """Frozen-model targets of the forget part, made before the gradient forward (ViKeR's R); None."""
        return None

    def forget_loss(self, out: dict, mb, spec: LossSpec, refs, dev):
        """(per-example forget loss [B], diagnostics) from the forward's parts: name -> (logits, labels, mask)."""
        raise NotImplementedError

    def loss(self, net, model, mb, spec: LossSpec, inputs, dev):
        """(scalar loss of this micro-batch, per-example diagnostics named forget/... and retain/...)."""
        from .forward import forward_parts, frozen_logits
        self.check_batch(mb, spec)
        # Frozen-model targets first: the gradient forward's activations are not alive during them.
        refs = self.references(model, mb, spec, inputs, dev)
        terms = self.retain_terms(spec)
        vanilla = frozen_logits(model, mb.retain, inputs, dev)[0] if any(t == "kl" for t, _ in terms) else None
        parts = {"forget": mb.forget}
        if self.idk_answers:
            parts[IDK] = mb.idk
        if mb.retain:
            parts[RETAIN] = mb.retain
        out = forward_parts(net, model, parts, inputs, dev)
        return self.combine(out, mb, spec, dev, refs=refs, vanilla=vanilla)

    def combine(self, out: dict, mb, spec: LossSpec, dev, refs=None, vanilla=None):
        """The loss from the forward's parts: mean forget loss + alpha x each retain loss (plain tensors).

        `vanilla`: the vanilla model's retain logits (term "kl") or hidden states (term "hidden", RMU's, whose
        parts carry hidden states in the logits' place).
        """
        from ..losses import kl_retain_loss, nll_loss, rmu_retain_loss
        forget, d = self.forget_loss(out, mb, spec, refs, dev)
        total = forget.mean()
        diags = {"forget/loss": forget, **{"forget/" + _short(k, "forget_"): v for k, v in d.items()}}
        if RETAIN in out:
            r_logits, r_labels, r_mask = out[RETAIN]
            for term, alpha in self.retain_terms(spec):
                if term == "kl":   # against the vanilla model's logits, made before the forward
                    value, d = kl_retain_loss(r_logits, vanilla, r_mask)
                elif term == "hidden":
                    value, d = rmu_retain_loss(r_logits, vanilla, r_mask)
                else:
                    value, d = nll_loss(r_logits, r_labels, r_mask)
                total = total + alpha * value.mean()
                diags.update({"retain/" + _short(k, "retain_"): v for k, v in d.items()})
        return total, diags


def _short(name: str, prefix: str) -> str:
    return name[len(prefix):] if name.startswith(prefix) else name
