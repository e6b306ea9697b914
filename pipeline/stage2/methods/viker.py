"""ViKeR: mean_i [ log Q_i(y_i) + lambda_i * D(R~_i, Q~_i) ] against the reference distribution R.

R is stage one's averaged reference distribution, read from the cache (REFS)
or, with train.online_reference, computed during training
(forward.online_references). Ablations: train.use_ga=false is "w/o GA"; a
cache made with precompute.reference=own is "w/o Vis"; train.regulariser
picks D (kl | jsd | cos); train.token_lambda the per-token lambda (ours).
The same under every convention (the conventions are the baselines').

Retain term (ours; the paper's ViKeR reads no retain data), chosen by
train.retain_term and weighted by alpha = train.retain_weight:
    none  NLL(retain), alpha 0 when unset: no term, the paper's loss
    nll   NLL(retain), alpha 1 when unset   (GradDiff's term: "ViKeR+NLL", sweep key viker+nll)
    kl    KL(P_vanilla || P_cur) on retain, alpha 1 when unset   (KL_Min's: "ViKeR+KL", sweep key viker+kl)
"""
from __future__ import annotations

from .base import REFS, RETAIN_TERMS, Defaults, Method, Variant, every_convention

# train.retain_term -> the retain term and its alpha when train.retain_weight is 0.
RETAIN = {"none": Defaults(retain_weight=0.0, retain=("nll",)),
          "nll": Defaults(retain_weight=1.0, retain=("nll",)),
          "kl": Defaults(retain_weight=1.0, retain=("kl",))}


def reference_variants() -> list[Variant]:
    """ViKeR over the references of precompute.span / precompute.names (ours), each with and without the
    gradient ascent and the retain NLL: the grid that asks which reference lets the regulariser forget.

    Keys: viker[+span|+names][-ga][+nll]; +names is span-aware references with textual counterfactuals.
    """
    out = []
    refs = (("", "", {}), ("+span", " span", {"span": "chain"}),
            ("+names", " span+names", {"span": "chain", "names": "swap"}))
    for ref_key, ref_label, reference in refs:
        for ga_key, ga_label, ga in (("", "", {}), ("-ga", " -GA", {"use_ga": False})):
            for nll_key, nll_label, nll in (("", "", {}), ("+nll", "+NLL", {"retain_term": "nll"})):
                key = f"viker{ref_key}{ga_key}{nll_key}"
                if key in ("viker", "viker+nll"):
                    continue      # the method itself, and the variant declared above
                label = f"ViKeR{ref_label}{nll_label}{ga_label}"
                out.append(Variant(key, label, "viker", {**ga, **nll}, reference))
    return out


class ViKeR(Method):
    name, label, position = "viker", "ViKeR", 60
    cache_fields = (REFS,)
    online_reference = True
    retain_term_choices = RETAIN_TERMS
    conventions = every_convention(RETAIN["none"])
    variants = (Variant("viker+nll", "ViKeR+NLL", "viker", {"retain_term": "nll"}),
                Variant("viker+kl", "ViKeR+KL", "viker", {"retain_term": "kl"}),
                *reference_variants())

    def defaults(self, spec):
        return RETAIN[spec.retain_term]

    def reads(self, spec):
        return () if spec.online else self.cache_fields

    def run_label(self, train: dict, cache_settings: dict) -> str:
        label = self.label
        if not train.get("use_ga", True):
            label += " w/o GA"
        if cache_settings.get("reference") == "own":
            label += " w/o Vis"
        if train.get("regulariser", "kl") != "kl":
            label += f" ({train['regulariser'].upper()})"
        if train.get("retain_term", "none") != "none":
            label += f"+{train['retain_term'].upper()}"
        return label

    def references(self, model, mb, spec, inputs, dev):
        if spec.online:
            from .forward import online_references
            return online_references(model, mb.forget, inputs, spec, dev)
        return mb.refs.to(dev)

    def forget_loss(self, out, mb, spec, refs, dev):
        from ..losses import entropy_token_lambda, viker_loss
        logits, labels, mask = out["forget"]
        lam_t = entropy_token_lambda(refs.entropy, mask, spec.lam) if spec.token_lambda else None
        return viker_loss(logits, labels, mask, refs.topk_idx, refs.topk_prob, refs.tail_mass, spec.lam,
                          kind=spec.regulariser, use_ga=spec.use_ga, token_lambda=lam_t)


METHOD = ViKeR()
