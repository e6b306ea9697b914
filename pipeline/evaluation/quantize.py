"""The quantization attack (`viker attack quantize`): do the forgotten facts come back once the weights are rounded?

Zhang et al. ("Does your LLM truly unlearn? An embarrassingly simple approach
to recover unlearned knowledge", arXiv 2410.16454, ICLR 2025) show that
quantizing an unlearned model to 4 bits restores much of what it forgot:
unlearning that keeps utility moves the weights by less than one quantization
step, so the unlearned and the original weights round to the same grid point.
A LoRA unlearning adapter is such a small delta.

The attack here:

  1. the adapter is merged into the model (peft merge_and_unload, as
     modeling.load_for_eval does), giving the unlearned model's full weights;
  2. for each scheme of `quantize.schemes` the weights are rounded as a
     deployment would round them and turned back into the model's dtype
     (quantize-dequantize: the rounding is emulated, the kernels are not):
     - fp16, bf16: every floating-point parameter cast to half precision and
       back (what a user serving the model in half precision gets, minus the
       half-precision arithmetic of the activations);
     - int8, int4: symmetric round-to-nearest, one absmax scale per group of
       `quantize.group_size` consecutive weights of a row (GPTQ's and AWQ's
       common 128; 0: one group per output row), `rtn`;
     - nf4: QLoRA's 4-bit NormalFloat (Dettmers et al. 2023, arXiv 2305.14314):
       the 16 levels bitsandbytes uses, one absmax per block of
       `quantize.nf4_block` consecutive weights of the flattened weight
       (bitsandbytes' default 64), no double quantization (transformers'
       default), `nf4`;
     the integer and NF4 schemes round the nn.Linear weights only, as
     bitsandbytes does when transformers loads a model in 8 or 4 bits: biases,
     norms and embeddings stay as they are, and so does the LM head
     (transformers' bitsandbytes integration never converts the output
     layer). `quantize.modules` language (default) rounds the language
     model's Linear layers, the ones unlearning changed; all rounds the vision
     tower's and the projector's too, as a bitsandbytes load would;
  3. fact accuracy (factcheck.fact_accuracy: the greedy answer contains the
     fact) is measured on each set of `quantize.sets` (forget: Forget ACC;
     retain, test, real: utility) for the unquantized model (scheme none) and
     each scheme. The vanilla model goes through the same schemes, and so
     does the gold model (trained without the forget people) when given; their
     numbers are computed once and kept beside them (quantize-reference.json).

recovery = forget_acc(unlearned, scheme) / forget_acc(vanilla, scheme): the
vanilla model quantized the same way is the reference, so what quantization
itself destroys is not counted as forgetting. change = forget_acc(unlearned,
scheme) - forget_acc(unlearned, none): what the rounding brought back (or
took away), in accuracy. The gold model's recovery (gold_recovery) is the
control: a model that never learned the forget people, quantized the same
way, answers some questions by chance or from general knowledge; recovery
above it is knowledge the unlearning left in the weights.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from pipeline.config import DataConfig, ModelConfig, QuantizeConfig
from pipeline.data.records import Profile

from .factcheck import fact_accuracy, fact_count

# QLoRA's NormalFloat4 levels, as bitsandbytes hard-codes them (functional.get_4bit_type("nf4")):
# quantiles of N(0, 1) scaled to [-1, 1], with an exact 0.
NF4_LEVELS = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
              -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
              0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
              0.7229568362236023, 1.0)
CASTS = {"fp16": torch.float16, "bf16": torch.bfloat16}
SCHEMES = ("fp16", "bf16", "int8", "int4", "nf4")
UNQUANTIZED = "none"


# ------------------------------------------------------------------ one tensor

def _work_dtype(weight: torch.Tensor) -> torch.dtype:
    # Scales computed in bf16 would be rounded themselves; float64 input keeps its precision.
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def rtn(weight: torch.Tensor, bits: int, group_size: int = 128) -> torch.Tensor:
    """Symmetric round-to-nearest with one absmax scale per group, quantized and dequantized, in weight's dtype.

    Groups are `group_size` consecutive entries of the last dimension (a
    Linear weight's input features), per row; 0 (or a size >= the row): the
    whole row. A row not divisible by the size ends in a shorter group with its
    own absmax. Each entry becomes round(w / absmax * qmax) / qmax * absmax with
    qmax = 2^(bits-1) - 1, so |w - rtn(w)| <= absmax / (2 qmax) and rtn(rtn(w)) == rtn(w).
    """
    if int(bits) != bits or bits < 2:
        raise ValueError(f"round-to-nearest needs bits >= 2 (an integer), got {bits}")
    if int(group_size) != group_size or group_size < 0:
        raise ValueError(f"group size must be an integer >= 0 (0: one group per row), got {group_size}")
    if weight.numel() == 0:
        return weight.clone()
    qmax = 2 ** (int(bits) - 1) - 1
    w = weight.detach().to(_work_dtype(weight))
    rows = w.reshape(-1, w.shape[-1]) if w.ndim else w.reshape(1, 1)
    n = rows.shape[-1]
    size = n if group_size == 0 or group_size >= n else int(group_size)
    pad = (-n) % size
    if pad:   # zeros never raise a group's absmax: the short last group keeps its own scale
        rows = torch.nn.functional.pad(rows, (0, pad))
    groups = rows.reshape(rows.shape[0], -1, size)
    absmax = groups.abs().amax(-1, keepdim=True)
    absmax = torch.where(absmax > 0, absmax, torch.ones_like(absmax))   # an all-zero group stays zero
    # q / qmax * absmax, not q * (absmax / qmax): the largest entry comes back as absmax exactly (idempotence)
    out = torch.round(groups / absmax * qmax) / qmax * absmax
    return out.reshape(rows.shape[0], -1)[:, :n].reshape(weight.shape).to(weight.dtype)


def nf4(weight: torch.Tensor, block: int = 64) -> torch.Tensor:
    """QLoRA's NF4, quantized and dequantized, in weight's dtype: bitsandbytes' blockwise 4-bit NormalFloat.

    The weight is flattened (row-major) and cut into blocks of `block` entries
    (the last one shorter when the size does not divide), each scaled by its
    absmax into [-1, 1] and rounded to the nearest of NF4_LEVELS (a value on a
    midpoint goes to the lower level, as bitsandbytes' comparisons do).
    """
    if int(block) != block or block < 1:
        raise ValueError(f"NF4 block size must be an integer >= 1, got {block}")
    if weight.numel() == 0:
        return weight.clone()
    dtype = _work_dtype(weight)
    flat = weight.detach().to(dtype).reshape(-1)
    n = flat.numel()
    blocks = torch.nn.functional.pad(flat, (0, (-n) % int(block))).reshape(-1, int(block))
    absmax = blocks.abs().amax(-1, keepdim=True)
    absmax = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    levels = torch.tensor(NF4_LEVELS, dtype=dtype, device=flat.device)
    index = torch.bucketize(blocks / absmax, (levels[1:] + levels[:-1]) / 2)
    return (levels[index] * absmax).reshape(-1)[:n].reshape(weight.shape).to(weight.dtype)


def cast(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The weight stored in `dtype` and read back in its own dtype (round to nearest even)."""
    return weight.detach().to(dtype).to(weight.dtype)


def quantize_tensor(weight: torch.Tensor, scheme: str, group_size: int = 128, nf4_block: int = 64) -> torch.Tensor:
    """One scheme (SCHEMES) applied to one tensor, dequantized into its dtype."""
    if scheme in CASTS:
        return cast(weight, CASTS[scheme])
    if scheme in ("int8", "int4"):
        return rtn(weight, int(scheme[3:]), group_size)
    if scheme == "nf4":
        return nf4(weight, nf4_block)
    raise ValueError(f"unknown quantization scheme {scheme!r} (known: {', '.join(SCHEMES)})")


# ------------------------------------------------------------------ a model

def rounded_linears(model, modules: str = "language") -> list[torch.nn.Linear]:
    """The nn.Linear layers the integer and NF4 schemes round: the language model's, or all; never the LM head."""
    from pipeline.models.forward import language_model, output_head
    if modules not in ("language", "all"):
        raise ValueError(f"quantize.modules is language or all, got {modules!r}")
    if any(hasattr(m, "lora_A") for m in model.modules()):
        # Rounding a LoRA layer's base weight would leave the unlearning delta in full precision.
        raise ValueError("the model still holds LoRA layers: merge the adapter (merge_and_unload) before quantizing")
    head = output_head(model)
    root = language_model(model) if modules == "language" else model
    return [m for m in root.modules() if isinstance(m, torch.nn.Linear) and m is not head]


@torch.no_grad()
def quantize_model(model, scheme: str, settings: QuantizeConfig) -> int:
    """Round `model`'s weights in place by `scheme` (module doc); returns how many weight tensors it rounded."""
    if scheme in CASTS:
        params = [p for p in model.parameters() if p.is_floating_point()]
    elif scheme in SCHEMES:
        params = [m.weight for m in rounded_linears(model, settings.modules)]
    else:
        raise ValueError(f"unknown quantization scheme {scheme!r} (known: {', '.join(SCHEMES)})")
    unique = list({id(p): p for p in params}.values())     # a tied weight once
    for p in unique:
        p.copy_(quantize_tensor(p, scheme, settings.group_size, settings.nf4_block))
    return len(unique)


def schemes_of(settings: QuantizeConfig) -> list[str]:
    """none (the unquantized model) first, then quantize.schemes in order, each once."""
    return list(dict.fromkeys([UNQUANTIZED, *settings.schemes]))


def scheme_tag(scheme: str, settings: QuantizeConfig) -> str:
    """What a scheme's numbers depend on beyond the data: its own settings (the memo key's part)."""
    if scheme in ("int8", "int4"):
        return f"{scheme}|group{settings.group_size}|{settings.modules}"
    if scheme == "nf4":
        return f"nf4|block{settings.nf4_block}|{settings.modules}"
    return scheme


class Rounder:
    """A loaded model put through one scheme after another, each from the weights it came with.

    Calling it with a scheme returns the model rounded by that scheme (none:
    as it came). The original weights are kept on the CPU from the first
    rounding on, and restored before each other scheme.
    """

    def __init__(self, model, settings: QuantizeConfig):
        self.model, self.settings, self.current, self.kept = model, settings, UNQUANTIZED, None

    @torch.no_grad()
    def __call__(self, scheme: str):
        if scheme != self.current:
            if self.kept is None:
                self.kept = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
            elif self.current != UNQUANTIZED:
                self.model.load_state_dict(self.kept)
            if scheme != UNQUANTIZED:
                quantize_model(self.model, scheme, self.settings)
            self.current = scheme
        return self.model


# ------------------------------------------------------------------ the sets

def fact_sets(data: DataConfig, names) -> dict[str, tuple[list[Profile], bool, str]]:
    """{set name: (profiles, on the person's other images, split)} as evaluation reads them (evaluate.eval_sets)."""
    from pipeline.data.loaders import default_splits
    from .evaluate import eval_sets
    names = list(dict.fromkeys(names))
    given = {"retain": data.retain_split, "test": data.test_split, "real": data.real_split}
    needs = [n for n in names if n in given and not given[n]]
    pairs = default_splits(data.benchmark, data.forget_split) if needs else {}
    splits = {"forget": data.forget_split, **{n: given[n] or pairs.get(n, "") for n in given}}
    sets = eval_sets(data.root, data.forget_split, splits["retain"], splits["test"], splits["real"], names=names,
                     benchmark=data.benchmark)
    return {n: (*sets[n], splits[n]) for n in names}


def set_accuracy(model, processor, profiles: list[Profile], other_images: bool, batch_size: int, desc: str) -> float:
    return float(fact_accuracy(model, processor, profiles, held_out=other_images, batch_size=batch_size,
                               desc=desc)["acc"])


def accuracies(model, processor, sets: dict, settings: QuantizeConfig, batch_size: int = 32) -> dict:
    """{scheme: {set: fact accuracy}} of a loaded model for none and every scheme; the model ends rounded."""
    rounder, out = Rounder(model, settings), {}
    for scheme in schemes_of(settings):
        m = rounder(scheme)
        out[scheme] = {name: set_accuracy(m, processor, profiles, other, batch_size, f"quantize {scheme} {name}")
                       for name, (profiles, other, _) in sets.items()}
    return out


def reference_accuracies(model_dir, sets: dict, settings: QuantizeConfig, data_key: str, dtype: str = "auto",
                         device: str = "auto", batch_size: int = 32) -> dict:
    """accuracies() of a reference model (vanilla or gold), each value computed once and kept beside the model.

    A value is remembered in quantize-reference.json under
    data|set=split|scheme's settings|weights' dtype; the model is loaded only
    when one is missing, and once.
    """
    from pipeline.cache.filememo import remembered
    from pipeline.models.modeling import load_for_eval, resolve_device, resolve_dtype
    weights = str(resolve_dtype(dtype, resolve_device(device))).replace("torch.", "")
    loaded: list = []
    out: dict = {}
    for scheme in schemes_of(settings):
        for name, (profiles, other, split) in sets.items():
            def compute(scheme=scheme, name=name, profiles=profiles, other=other) -> float:
                if not loaded:
                    model, processor = load_for_eval(model_dir, None, dtype, device)
                    loaded.extend([Rounder(model, settings), processor])
                return set_accuracy(loaded[0](scheme), loaded[1], profiles, other, batch_size,
                                    f"quantize reference {scheme} {name}")
            key = f"{data_key}|{name}={split}|{scheme_tag(scheme, settings)}|{weights}"
            out.setdefault(scheme, {})[name] = float(remembered(Path(model_dir) / "quantize-reference.json", key,
                                                                compute))
    return out


# ------------------------------------------------------------------ the attack

def attack(model: ModelConfig, data: DataConfig, settings: QuantizeConfig, *, adapter=None, reference: str = "",
           gold: str = "", batch_size: int = 32) -> dict:
    """The attack (module doc) on model.path (+ `adapter`, merged) against `reference` (default: model.path).

    `gold` (empty: none) adds the control. Returns plain data: the settings,
    the question counts per set and, per scheme, the accuracies and recoveries
    (with_recovery). Bad data fails before any model loads.
    """
    import gc
    from pipeline.models.modeling import load_for_eval
    if "forget" not in settings.sets:
        raise ValueError(f"quantize.sets must include forget (recovery is measured there), got {settings.sets!r}")
    sets = fact_sets(data, settings.sets)
    loaded, processor = load_for_eval(model.path, adapter, model.dtype, model.device)
    attacked = accuracies(loaded, processor, sets, settings, batch_size)
    del loaded
    gc.collect()
    key = f"{Path(data.root).resolve()}|{data.forget_split}|{data.benchmark}"
    vanilla = reference_accuracies(reference or model.path, sets, settings, key, model.dtype, model.device,
                                   batch_size)
    control = (reference_accuracies(gold, {"forget": sets["forget"]}, settings, key, model.dtype, model.device,
                                    batch_size) if gold else None)
    result = {"schemes": schemes_of(settings), "sets": list(sets), "group_size": settings.group_size,
              "nf4_block": settings.nf4_block, "modules": settings.modules,
              "n_qa": {name: fact_count(profiles, other) for name, (profiles, other, _) in sets.items()}}
    return {**result, "by_scheme": with_recovery(attacked, vanilla, control)}


def _ratio(a: float, b: float) -> float:
    return a / b if b and not math.isnan(b) else float("nan")


def with_recovery(attacked: dict, vanilla: dict, gold: dict | None = None) -> dict:
    """{scheme: numbers}: acc_<set> (the attacked model), vanilla_acc_<set>, gold_acc_forget (with a gold model),
    recovery = acc_forget / vanilla_acc_forget, gold_recovery = gold_acc_forget / vanilla_acc_forget, and
    change = acc_forget - the unquantized acc_forget. NaN: undefined (a vanilla model that knows nothing)."""
    out = {}
    for scheme, accs in attacked.items():
        row = {f"acc_{name}": acc for name, acc in accs.items()}
        row.update({f"vanilla_acc_{name}": acc for name, acc in vanilla[scheme].items()})
        row["recovery"] = _ratio(accs["forget"], vanilla[scheme]["forget"])
        row["change"] = accs["forget"] - attacked[UNQUANTIZED]["forget"]
        if gold is not None:
            row["gold_acc_forget"] = gold[scheme]["forget"]
            row["gold_recovery"] = _ratio(gold[scheme]["forget"], vanilla[scheme]["forget"])
        out[scheme] = row
    return out


def finite(result: dict) -> dict:
    """The result with NaN as None, for JSON (nested dicts and lists kept)."""
    if isinstance(result, dict):
        return {k: finite(v) for k, v in result.items()}
    if isinstance(result, list):
        return [finite(v) for v in result]
    return None if isinstance(result, float) and math.isnan(result) else result


def _percent(value) -> str:
    return "n/a" if value is None or value != value else f"{100 * value:.1f}%"


def format_attack(result: dict, label: str) -> str:
    """The attack's table: one line per scheme, the unquantized model first."""
    n = result["n_qa"]
    utility = [s for s in result["sets"] if s != "forget"]
    rows = result["by_scheme"]
    has_gold = any("gold_acc_forget" in r for r in rows.values())
    head = (f"{label}: quantization attack, Forget ACC on {n['forget']:g} forget QA"
            + "".join(f", {s} ACC on {n[s]:g} QA" for s in utility)
            + f" (int8/int4 group {result['group_size'] or 'row'}, nf4 block {result['nf4_block']}, "
              f"{result['modules']} Linear layers; recovery = Forget ACC / the vanilla model's, same scheme)")
    columns = ["scheme", "forget", "change", "vanilla", "recovery"] + (["gold", "gold rec."] if has_gold else []) \
        + [c for s in utility for c in (s, f"vanilla {s}")]
    table = [columns]
    for scheme, r in rows.items():
        change = r["change"]
        line = [scheme, _percent(r["acc_forget"]),
                "-" if scheme == UNQUANTIZED else ("n/a" if change is None or change != change
                                                   else f"{100 * change:+.1f} pts"),
                _percent(r["vanilla_acc_forget"]), _percent(r["recovery"])]
        if has_gold:
            line += [_percent(r.get("gold_acc_forget")), _percent(r.get("gold_recovery"))]
        line += [_percent(r[k]) for s in utility for k in (f"acc_{s}", f"vanilla_acc_{s}")]
        table.append(line)
    widths = [max(len(row[i]) for row in table) for i in range(len(columns))]
    return "\n".join([head] + ["  " + "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w)
                                                in enumerate(zip(row, widths))).rstrip() for row in table])
