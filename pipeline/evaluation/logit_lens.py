"""The logit-lens attack (`viker attack logit-lens`): is the forgotten answer still readable inside the model?

An unlearned model may stop *saying* a fact while its hidden states still
carry it: unlearning may change only what the last layers do with an answer
the earlier ones still compute. The logit lens (nostalgebraist, "interpreting
GPT: the logit lens", 2020) reads an intermediate hidden state the way the
model reads its last one, through the final norm and the LM head. Patil, Hase
and Bansal ("Can sensitive information be deleted from LLMs? Objectives for
defending against extraction attacks", arXiv 2309.17410, ICLR 2024) made it
an extraction attack on edited models, the Head Projection attack: the deleted
answer counts as extracted when it is among the top tokens the LM head reads
off an intermediate layer. UnLOK-VQA (Patil et al., "Unlearning sensitive
information in multimodal LLMs: benchmark and attack-defense evaluation",
arXiv 2505.01456) runs that attack on LLaVA-style models after unlearning, and
finds the defenses that remove the answer from the hidden states the most
robust. Lucki et al. ("An adversarial perspective on machine unlearning for
AI safety", arXiv 2409.18025; github.com/ethz-spylab/unlearning-vs-safety,
src/logit_lens/) decode every decoder block's output through model.norm and
lm_head and report, per layer, how often the right answer comes out on top.
Read for the method; no code copied.

The attack here, on every training QA of the forget set (the question on the
person's own picture, teacher-forced on the ground-truth answer: the prompt and
answer the unlearning trained on, prompts.train_text):

  1. the adapter is merged into the model (modeling.load_for_eval);
  2. one forward pass keeps, at each answer position, the output h_l of every
     decoder layer l (0-based, as the modules are named: model.layers.l; the
     last, L-1, is the final layer);
  3. lens_l = lm_head(final_norm(h_l)): the logits the model would give if it
     stopped after layer l. At the final layer this is the model's own output
     (its forward applies the same norm and head; tests/test_logit_lens.py
     checks the two agree);
  4. for the true next token y of each position: its probability
     softmax(lens_l)[y] and its rank, the number of tokens with a strictly
     larger logit (rank 0: the lens's top-1; a tie counts in the true token's
     favour). A position is a hit at layer l when rank < logit_lens.top_k (1:
     top-1; Patil et al.'s candidate budget B is a larger k).

Token classes. Numbers are pooled over positions (each token weighs the same):
  - all: every answer token (EOS is not part of the answer, as in mia.py);
  - fact: the answer tokens that spell the fact (QA.fact, what factcheck looks
    for; a benchmark without one: the whole answer), found by decoding the
    answer one token more at a time and keeping the tokens whose characters
    overlap the fact's first occurrence in the decoded answer (case-insensitive).
The fact tokens are the key tokens of this attack: they are what unlearning
must remove and what Forget ACC scores. The template around them ("This
person was born in") is predictable from the format alone, by the gold model
too, and would pull every model's score toward the same high value. The class
depends on the data only, not on a model or a cache: the unlearned, vanilla
and gold models are scored on the same positions (the reference cache's
high-entropy key tokens would make the class depend on stage one's pool and
k). A fact not found in its decoded answer leaves that item without fact
tokens; n_items_without_fact counts such items.

Score and recovery. Per layer and class: top_<class>[l], the share of hits,
and prob_<class>[l], the mean true-token probability. The score is the best
layer's hit rate on the class logit_lens.tokens (fact by default):
  best_layer = the argmax over l < L-1 (the final layer left out: what the
    model knows but does not say), best_layer_any = the argmax over every l;
    ties go to the earlier layer;
  recovery = top[best_layer](unlearned) / top[best_layer](vanilla), the
    vanilla model read at the same layer; recovery_any likewise.
The best layer is picked after seeing the unlearned model's curve: an
attacker's choice, and an optimistic one (a maximum over L-1 or L noisy rates
is biased upward, more so on few forget QA). The curves are reported beside
it. The control is the gold model (trained without the forget people) under
the same rule: gold_recovery = its own best layer's rate / the vanilla model's
rate at that layer. A rate above the gold model's is knowledge the unlearning
left in the hidden states.
"""
from __future__ import annotations

import functools
import math
from pathlib import Path

import torch

from pipeline.config import DataConfig, LogitLensConfig, ModelConfig
from pipeline.data.records import Profile
from pipeline.models.encoding import encode_pair, load_image, max_positions, pixel_values
from pipeline.models.forward import forward_inputs, language_model, make_text_batch, output_head, unwrap
from pipeline.models.prompts import train_text

TOKEN_CLASSES = ("all", "fact")
# Part of the reference memo's key: a change to how the token classes are drawn must not reuse old curves.
CLASSES_ID = "fact-overlap"


# ------------------------------------------------------------------ one position

def lens_logits(hidden: torch.Tensor, norm, head) -> torch.Tensor:
    """[..., V] logits of hidden states [..., D] read through the final norm and the LM head."""
    return head(norm(hidden))


def true_token_stats(logits: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(probability, rank) of the true token ids [...] under logits [..., V], in float32.

    rank: how many tokens have a strictly larger logit (0: top-1, ties in the true token's favour).
    """
    logits = logits.float()
    index = ids.long().unsqueeze(-1)
    true = logits.gather(-1, index)
    rank = (logits > true).sum(-1)
    prob = torch.softmax(logits, dim=-1).gather(-1, index).squeeze(-1)
    return prob, rank


# ------------------------------------------------------------------ which tokens

def fact_token_mask(decode, answer_ids: list[int], fact: str) -> list[bool]:
    """Per answer token: does it spell part of `fact`? `decode`: token ids -> text (the tokenizer's).

    Token t covers the characters decode(ids[:t+1]) adds to decode(ids[:t]); it is a
    fact token when they overlap the fact's first occurrence in decode(ids) (case-insensitive).
    No occurrence (or an empty fact): no fact token.
    """
    text = decode(answer_ids).lower()
    fact = fact.strip().lower()
    start = text.find(fact) if fact else -1
    if start < 0:
        return [False] * len(answer_ids)
    end = start + len(fact)
    ends = [len(decode(answer_ids[:t])) for t in range(len(answer_ids) + 1)]
    return [ends[t] < end and ends[t + 1] > start for t in range(len(answer_ids))]


def lens_items(profiles: list[Profile]) -> list[tuple[str, object, str, str, str]]:
    """(sample_id, image, prompt, answer, fact) of every training QA, on the profile's own image (mia.qa_items'
    prompt and answer, plus the fact)."""
    items = []
    for p in profiles:
        image = load_image(p.image, f"profile {p.id} image")
        for j, qa in enumerate(p.qa):
            prompt, answer = train_text(qa.question, qa.answer)
            items.append((f"{p.id}/{j}", image, prompt, answer, qa.fact or qa.answer))
    return items


# ------------------------------------------------------------------ the model

def lens_parts(model):
    """(decoder layers, final norm, LM head) of any supported family (families.Family.decoder holds both)."""
    decoder = language_model(model)
    layers, norm = getattr(decoder, "layers", None), getattr(decoder, "norm", None)
    if layers is None or norm is None:
        raise ValueError(f"the language model {type(decoder).__name__} has no `layers` and final `norm`: "
                         f"the logit lens cannot read it")
    return layers, norm, output_head(model)


def _keep_at(kept: list, layer: int, positions: torch.Tensor, module, args, output) -> None:
    """Forward hook: layer `layer`'s output at the answer positions only.

    A 7B's whole [B, L, D] output for every layer would not fit in memory; the answer positions are a few dozen.
    """
    hidden = output[0] if isinstance(output, tuple) else output
    kept[layer] = torch.gather(hidden, 1, positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))


def _lens_batches(model, processor, items: list[tuple], batch_size: int):
    """Yield (batch, pixels, {class: [B, T] bool mask}) per batch of lens_items; each picture preprocessed once."""
    param = next(model.parameters())
    tok = processor.tokenizer
    decode = functools.partial(tok.decode, skip_special_tokens=True)
    limit = max_positions(model)
    distinct = {id(image): image for _, image, *_ in items}
    slot = {key: n for n, key in enumerate(distinct)}
    all_pixels = pixel_values(processor, list(distinct.values())) if distinct else None
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        pairs = [encode_pair(processor, prompt, answer, f"logit-lens sample {sid}", limit)
                 for sid, _, prompt, answer, _ in chunk]
        batch = make_text_batch([ids for ids, _ in pairs], [a for _, a in pairs], tok.pad_token_id).to(param.device)
        fact = torch.zeros_like(batch.answer_mask, dtype=torch.bool)
        for i, ((ids, a), item) in enumerate(zip(pairs, chunk)):
            fact[i, :len(ids) - a] = torch.tensor(fact_token_mask(decode, ids[a:], item[4]), dtype=torch.bool)
        pixels = all_pixels[[slot[id(item[1])] for item in chunk]].to(param.device, param.dtype)
        yield batch, pixels, {"all": batch.answer_mask > 0, "fact": fact}


def layer_outputs(model, layers, batch, pixels) -> list[torch.Tensor]:
    """[B, T, D] output of every decoder layer at the answer positions, from one teacher-forced forward."""
    kept: list = [None] * len(layers)
    hooks = [layer.register_forward_hook(functools.partial(_keep_at, kept, i, batch.answer_pos))
             for i, layer in enumerate(layers)]
    try:
        unwrap(model).model(**forward_inputs(model, batch.input_ids, batch.attention_mask, pixels), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return kept


@torch.no_grad()
def lens_curve(model, processor, items: list[tuple], batch_size: int = 32, top_k: int = 1) -> dict:
    """Per layer and token class, the hit rate and mean true-token probability over `items` (lens_items).

    Returns plain data: {"layers": L, "top_k", "n_items", "n_items_without_fact", "n_<class>": positions,
    "top_<class>": [L] hit rates, "prob_<class>": [L] mean probabilities} (NaN where a class has no position).
    """
    if int(top_k) != top_k or top_k < 1:
        raise ValueError(f"logit_lens.top_k must be an integer >= 1, got {top_k}")
    layers, norm, head = lens_parts(model)
    n_layers = len(layers)
    hits = {c: torch.zeros(n_layers, dtype=torch.float64) for c in TOKEN_CLASSES}
    probs = {c: torch.zeros(n_layers, dtype=torch.float64) for c in TOKEN_CLASSES}
    counts = dict.fromkeys(TOKEN_CLASSES, 0)
    without_fact = 0
    for batch, pixels, masks in _lens_batches(model, processor, items, batch_size):
        for layer, hidden in enumerate(layer_outputs(model, layers, batch, pixels)):
            prob, rank = true_token_stats(lens_logits(hidden, norm, head), batch.answer_ids)
            for c, mask in masks.items():
                hits[c][layer] += (rank[mask] < top_k).sum().item()
                probs[c][layer] += prob[mask].double().sum().item()
        for c, mask in masks.items():
            counts[c] += int(mask.sum())
        without_fact += int((~masks["fact"].any(-1)).sum())
    out = {"layers": n_layers, "top_k": int(top_k), "n_items": len(items), "n_items_without_fact": without_fact}
    for c in TOKEN_CLASSES:
        n = counts[c]
        out[f"n_{c}"] = n
        out[f"top_{c}"] = (hits[c] / n).tolist() if n else [math.nan] * n_layers
        out[f"prob_{c}"] = (probs[c] / n).tolist() if n else [math.nan] * n_layers
    return out


def reference_curve(model_dir, items: list[tuple], top_k: int, data_key: str, dtype: str = "auto",
                    device: str = "auto", batch_size: int = 32) -> dict:
    """lens_curve() of a reference model (vanilla or gold), computed once and kept beside it (logit-lens-reference.json,
    under data|top_k|weights' dtype|the token classes' definition)."""
    from pipeline.cache.filememo import remembered
    from pipeline.models.modeling import load_for_eval, resolve_device, resolve_dtype
    weights = str(resolve_dtype(dtype, resolve_device(device))).replace("torch.", "")

    def compute() -> dict:
        model, processor = load_for_eval(model_dir, None, dtype, device)
        return lens_curve(model, processor, items, batch_size, top_k)
    key = f"{data_key}|top{int(top_k)}|{weights}|{CLASSES_ID}"
    return remembered(Path(model_dir) / "logit-lens-reference.json", key, compute)


# ------------------------------------------------------------------ the attack

def best_layer(rates: list[float], include_final: bool) -> int:
    """The layer with the highest rate (the earliest of equals); the final layer only when include_final.

    NaN rates never win; all NaN: layer 0.
    """
    candidates = rates if include_final else rates[:-1]
    if not candidates:
        raise ValueError("the model has 1 decoder layer: there is no layer before the final one to read")
    finite = [(r, -i) for i, r in enumerate(candidates) if not math.isnan(r)]
    return -max(finite)[1] if finite else 0


def _ratio(a: float, b: float) -> float:
    return a / b if b and not math.isnan(b) and not math.isnan(a) else math.nan


def with_recovery(attacked: dict, vanilla: dict, gold: dict | None, tokens: str) -> dict:
    """The attack's numbers on class `tokens` from three curves (lens_curve): the best layers, scores, recoveries.

    best_layer / score / vanilla_score / recovery: the best layer before the final one; *_any: over every
    layer; final / vanilla_final: the final layer's rates; gain = score - final (what the lens reads that the
    model does not say); gold_best_layer / gold_score / gold_recovery / gold_final with a gold curve.
    """
    if tokens not in TOKEN_CLASSES:
        raise ValueError(f"logit_lens.tokens is one of {', '.join(TOKEN_CLASSES)}, got {tokens!r}")
    if vanilla["layers"] != attacked["layers"] or (gold is not None and gold["layers"] != attacked["layers"]):
        raise ValueError(f"the attacked model has {attacked['layers']} decoder layers, the vanilla model "
                         f"{vanilla['layers']}" + (f" and the gold model {gold['layers']}" if gold else "")
                         + ": the logit lens compares layers of one architecture")
    rates, base = attacked[f"top_{tokens}"], vanilla[f"top_{tokens}"]
    best, best_any = best_layer(rates, False), best_layer(rates, True)
    out = {"best_layer": best, "score": rates[best], "vanilla_score": base[best],
           "recovery": _ratio(rates[best], base[best]),
           "best_layer_any": best_any, "score_any": rates[best_any], "vanilla_score_any": base[best_any],
           "recovery_any": _ratio(rates[best_any], base[best_any]),
           "final": rates[-1], "vanilla_final": base[-1], "gain": rates[best] - rates[-1]}
    if gold is not None:
        g = gold[f"top_{tokens}"]
        gb = best_layer(g, False)
        out.update(gold_best_layer=gb, gold_score=g[gb], gold_recovery=_ratio(g[gb], base[gb]), gold_final=g[-1])
    return out


def attack(model: ModelConfig, data: DataConfig, settings: LogitLensConfig, *, adapter=None, reference: str = "",
           gold: str = "", batch_size: int = 32) -> dict:
    """The attack (module doc) on model.path (+ `adapter`, merged) against `reference` (default: model.path).

    `gold` (empty: none) adds the control. Returns plain data: the settings, the counts, the three curves
    and the summary (with_recovery). Bad data fails before any model loads.
    """
    import gc
    from pipeline.data.loaders import read_profiles
    from pipeline.models.modeling import load_for_eval
    if settings.tokens not in TOKEN_CLASSES:
        raise ValueError(f"logit_lens.tokens is one of {', '.join(TOKEN_CLASSES)}, got {settings.tokens!r}")
    items = lens_items(read_profiles(data.root, data.forget_split, data.benchmark))
    if not items:
        raise ValueError(f"the forget split {data.forget_split} has no training QA: nothing to read")
    loaded, processor = load_for_eval(model.path, adapter, model.dtype, model.device)
    attacked = lens_curve(loaded, processor, items, batch_size, settings.top_k)
    del loaded
    gc.collect()
    key = f"{Path(data.root).resolve()}|{data.forget_split}|{data.benchmark}"
    vanilla = reference_curve(reference or model.path, items, settings.top_k, key, model.dtype, model.device,
                              batch_size)
    control = (reference_curve(gold, items, settings.top_k, key, model.dtype, model.device, batch_size)
               if gold else None)
    return {"tokens": settings.tokens, "top_k": settings.top_k, "layers": attacked["layers"],
            "n_items": attacked["n_items"], "n_items_without_fact": attacked["n_items_without_fact"],
            "n_tokens": {c: attacked[f"n_{c}"] for c in TOKEN_CLASSES},
            "curves": {"unlearned": attacked, "vanilla": vanilla, "gold": control},
            "summary": with_recovery(attacked, vanilla, control, settings.tokens)}


def _percent(value) -> str:
    return "n/a" if value is None or value != value else f"{100 * value:.1f}%"


def format_attack(result: dict, label: str) -> str:
    """The per-layer table (unlearned, vanilla, gold) and the summary lines."""
    tokens, k, n = result["tokens"], result["top_k"], result["n_tokens"]
    curves, s = result["curves"], result["summary"]
    hit = "top-1" if k == 1 else f"top-{k}"
    has_gold = curves.get("gold") is not None
    head = (f"{label}: logit-lens attack on {result['n_items']} forget QA ({n['fact']} fact tokens, {n['all']} "
            f"answer tokens); a hit: the true token is the lens's {hit}; score on {tokens} tokens")
    columns = ["layer", f"fact {hit}", "vanilla", *(["gold"] if has_gold else []), "fact p", "vanilla p",
               f"all {hit}", "vanilla"]
    table = [columns]
    final = result["layers"] - 1
    for layer in range(result["layers"]):
        def at(which, key):
            return curves[which][key][layer]
        line = [f"{layer}{' (final)' if layer == final else ''}", _percent(at("unlearned", "top_fact")),
                _percent(at("vanilla", "top_fact")), *([_percent(at("gold", "top_fact"))] if has_gold else []),
                _percent(at("unlearned", "prob_fact")), _percent(at("vanilla", "prob_fact")),
                _percent(at("unlearned", "top_all")), _percent(at("vanilla", "top_all"))]
        table.append(line)
    widths = [max(len(row[i]) for row in table) for i in range(len(columns))]
    lines = [head] + ["  " + "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w)
                                       in enumerate(zip(row, widths))).rstrip() for row in table]
    gold_text = (f"; gold layer {s['gold_best_layer']}: {_percent(s['gold_score'])}, gold rec. "
                 f"{_percent(s['gold_recovery'])}" if has_gold else "")
    lines.append(f"  best layer before the final: {s['best_layer']}, {_percent(s['score'])} (vanilla "
                 f"{_percent(s['vanilla_score'])}, recovery {_percent(s['recovery'])}){gold_text}; final layer "
                 f"{_percent(s['final'])} (vanilla {_percent(s['vanilla_final'])})")
    lines.append(f"  best layer of all: {s['best_layer_any']}, {_percent(s['score_any'])} (recovery "
                 f"{_percent(s['recovery_any'])}). The best layer is picked after seeing the curve: an attacker's "
                 f"choice, biased upward")
    return "\n".join(lines)
