"""Evaluation by the MLLMU-Bench protocol: four sets, one results row per run.

Sets: forget (the forget split), test (the forget people on their *other*
images with paraphrased questions: does forgetting generalise?), retain (the
complementary split) and real (Retain_Set). Per set: multiple-choice accuracy
(image+text and text-only apart), generation ROUGE-1/2/L and BLEU, cloze
accuracy, fact accuracy on the training QA, and coherence of the generated
answers. Every number goes to a JSON-lines results file with the setting,
model, cache fingerprint and seed that produced it; every answer goes to a
per-sample file so that a number can be traced back to what the model said.

Few-shot multiple choice: the worked examples for item j of profile i are
item j (same position, so the same kind of question) of the next profiles of
the same set in file order, wrapping around; the profile itself is skipped,
because its other items would give its own answers away. A set with fewer
other profiles than `few_shot` gets fewer shots (a one-profile set gets none).
The default is one shot: MLLMU-Bench's many-shot prompt made vanilla LLaVA
answer "US US US".
"""
from __future__ import annotations

import math
from pathlib import Path

from pipeline.config import DataConfig, EvalConfig, ModelConfig, RelearnConfig
from pipeline.data.loaders import check_benchmark, default_splits, read_profiles
from pipeline.data.mllmu import SPLITS, DataError, files_signature, read_split, split_files
from pipeline.data.records import Profile
from pipeline.models.encoding import load_image
from pipeline.models.generation import generate
from pipeline.models.modeling import ModelError, load_for_eval, resolve_device
from pipeline.models.prompts import cloze_prompt, fact_prompt, generation_prompt, multiple_choice_prompt
from pipeline.progress import progress as tqdm  # plain log lines off a terminal
from pipeline.stage2.labels import file_slug

from . import metrics
from .factcheck import FACT_NEW_TOKENS, fact_accuracy, fact_count, fact_items, score_facts
from .protocol_mllmu import MC_NEW_TOKENS as OFFICIAL_MC_NEW_TOKENS
from .protocol_mllmu import PROTOCOL_ID, evaluate_official
from .results import append_result, mean, sample_row, write_jsonl
from .scoring import LL_METRIC_KEYS, likelihood_metrics


SET_NAMES = ("forget", "test", "retain", "real")
METRIC_KEYS = ("mc_acc", "mc_acc_image", "mc_acc_text", "rouge1", "rouge2", "rougeL", "bleu",
               "cloze_acc", "fact_acc", "fact_acc_image", "fact_acc_text", "coherence") + LL_METRIC_KEYS
# *_ll_*: by likelihood (scoring.py); fact_acc_image / _text: the fact check on 'this person' questions (the
# identity comes from the picture) and on questions that name the person (factcheck.question_kind).
TASKS = ("mc", "gen", "cloze", "fact")    # generated-answer tasks (evaluate.tasks)
# Room for "The answer is B" from a chatty model; the parser reads the letter.
MC_NEW_TOKENS = 8


# ------------------------------------------------------------------ model

def load_coherence_classifier(path, device: str = "auto", batch_size: int = 32):
    """A local HF text-classification model as a callable texts -> [{"label", "score"}]."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ModelError(f"coherence classifier {path} is not a local Hugging Face model directory "
                         f"(no config.json); leave evaluate.coherence_classifier empty for the model-free score")
    from transformers import pipeline
    pipe = pipeline("text-classification", model=str(path), tokenizer=str(path),
                    device=resolve_device(device), local_files_only=True)
    return lambda texts: pipe(list(texts), batch_size=batch_size, truncation=True)


# ------------------------------------------------------------------- data

def eval_sets(data_root, forget_split: str, retain_split: str = "", test_split: str = "Test_Set",
              real_split: str = "Retain_Set", names=SET_NAMES,
              benchmark: str = "mllmu", dropped: list | None = None) -> dict[str, tuple[list[Profile], bool]]:
    """{set name: (profiles, use_other_images)} for the requested sets; retain defaults to the complement.

    `dropped` collects the forget and retain training QA the reader left out for their content.
    """
    forget = read_profiles(data_root, forget_split, benchmark, dropped=dropped)
    forget_ids = {p.id for p in forget}
    loaders = {
        "forget": lambda: (forget, False),
        "test": lambda: (_test_profiles(data_root, test_split, forget_split, forget_ids, benchmark), True),
        "retain": lambda: (_retain_profiles(data_root,
                                            retain_split or default_splits(benchmark, forget_split)["retain"],
                                            forget_ids, benchmark, dropped), False),
        "real": lambda: (read_profiles(data_root, real_split, benchmark), False),
    }
    return {name: loaders[name]() for name in names}


def _test_profiles(root, split: str, forget_split: str, forget_ids: set, benchmark: str = "mllmu") -> list[Profile]:
    test = [p for p in read_profiles(root, split, benchmark) if p.id in forget_ids]
    if not test:
        raise DataError(f"split '{split}' has no profile of {forget_split}: the test set would be empty")
    return test


def _retain_profiles(root, split: str, forget_ids: set, benchmark: str = "mllmu",
                     dropped: list | None = None) -> list[Profile]:
    retain = read_profiles(root, split, benchmark, dropped=dropped)
    shared = sorted({p.id for p in retain} & forget_ids)
    if shared:
        raise DataError(f"split '{split}' shares {len(shared)} profile(s) with the forget split "
                        f"(e.g. {shared[0]}): retain must be disjoint from forget")
    return retain


def benchmark_vocabulary(data_root) -> set[str]:
    """Lower-case words of every question, answer and option of the benchmark (model-free coherence).

    Remembered per benchmark version for this process (every evaluation of a sweep needs it).
    """
    splits = [s for s in SPLITS if (Path(data_root) / s).is_dir()]
    key = tuple(files_signature(split_files(data_root, s)) for s in splits)
    if key not in _VOCABULARY:
        words: set[str] = set()
        for split in splits:
            for p in read_split(data_root, split, check_images=False):
                for text in _profile_texts(p):
                    # The coherence score's own word pattern, so the two agree on what a word is.
                    words.update(metrics._WORD.findall(text.lower()))
        _VOCABULARY.clear()                  # one benchmark at a time is the common case: keep one
        _VOCABULARY[key] = frozenset(words)
    return set(_VOCABULARY[key])


_VOCABULARY: dict = {}


def _profile_texts(p: Profile):
    yield from (p.biography, p.question, p.answer)
    for qa in p.qa:
        yield from (qa.question, qa.answer)
    for c in p.choices:
        yield c.question
        yield from c.options.values()
    for g in p.generation + p.cloze:
        yield from (g.question, g.ground_truth)


# ------------------------------------------------------------ one set

def evaluate_profiles(model, processor, profiles: list[Profile], use_other_images: bool, *, few_shot: int = 1,
                      max_new_tokens: int = 50, batch_size: int = 32, vocabulary: set[str] | None = None,
                      classifier=None, set_name: str = "", mc_new_tokens: int = MC_NEW_TOKENS,
                      likelihood: bool = True, tasks=TASKS):
    """(metrics, per-sample rows) for one set; a metric with no items, or of a task not asked, is None.

    `tasks` (TASKS): the generated-answer tasks to run; the demo leaves out mc and cloze, which a tiny
    model without instruction tuning answers with 0% and its table does not show (their likelihood
    versions, `likelihood`, read the same knowledge).

    Fact rows are the few examples factcheck.fact_accuracy hands back (no
    profile id): it returns the accuracy, not every answer.
    """
    if not profiles:
        raise DataError(f"set '{set_name}' has no profiles")
    images = [_eval_image(p, use_other_images) for p in profiles]
    run = _Runner(model, processor, batch_size, set_name)
    tasks = parse_tasks(tasks, allow_empty=True)     # empty: a set of gen alone outside evaluate.gen_sets
    none = lambda *keys: (dict.fromkeys(keys), [])
    mc, mc_rows = (_multiple_choice(run, profiles, images, few_shot, mc_new_tokens) if "mc" in tasks
                   else none("mc_acc", "mc_acc_image", "mc_acc_text"))
    # Open generation and the fact check decode in one pass: two passes of the same model over the same
    # pictures cost one decoding loop more (generation.generate cuts each answer to its own limit).
    gen_items = [(i, p, g) for i, p in enumerate(profiles) for g in p.generation] if "gen" in tasks else []
    facts = fact_items(profiles, held_out=use_other_images) if "fact" in tasks else []
    answers = run([images[i] for i, *_ in gen_items] + [f[0] for f in facts],
                  [generation_prompt(g.question) for *_, g in gen_items] + [fact_prompt(f[1]) for f in facts],
                  [max_new_tokens] * len(gen_items) + [FACT_NEW_TOKENS] * len(facts), "gen+fact")
    gen, gen_rows = (_generation(run.set_name, gen_items, answers[:len(gen_items)], vocabulary, classifier)
                     if "gen" in tasks else none(*metrics.ROUGE_TYPES, "bleu", "coherence"))
    cloze, cloze_rows = _cloze(run, profiles, images, max_new_tokens) if "cloze" in tasks else (None, [])
    fact = score_facts(facts, answers[len(gen_items):]) if "fact" in tasks else {}
    fact_rows = [sample_row(set_name, "", "fact", e["question"], e["fact"], e["answer"],
                         {"correct": e["fact"].lower() in e["answer"].lower()})
                 for e in fact.get("examples", [])]
    # Likelihood metrics cost ~4 teacher-forced forwards per item: `likelihood=False` leaves them None.
    ll, ll_rows = (likelihood_metrics(model, processor, profiles, images, batch_size, set_name) if likelihood
                   else (dict.fromkeys(LL_METRIC_KEYS), []))
    result = {**mc, **gen, "cloze_acc": cloze, **ll, **_fact_metrics(fact)}
    return {key: result[key] for key in METRIC_KEYS}, mc_rows + gen_rows + cloze_rows + fact_rows + ll_rows


def parse_tasks(tasks, allow_empty: bool = False) -> tuple[str, ...]:
    names = tuple(t.strip() for t in tasks.split(",")) if isinstance(tasks, str) else tuple(tasks)
    unknown = [t for t in names if t not in TASKS]
    if unknown or not (names or allow_empty):
        raise ValueError(f"unknown evaluation task(s) {unknown or list(names)}: choose from {', '.join(TASKS)}")
    return names


def _eval_image(p: Profile, use_other_images: bool):
    if not use_other_images:
        return load_image(p.image, f"profile {p.id}")
    if not p.images:
        raise DataError(f"profile {p.id} has no other images (`images`), needed for the test set")
    return load_image(p.images[0], f"profile {p.id} images[0]")


class _Runner:
    """Greedy answers for (image, prompt) items, with one progress bar per item kind."""

    def __init__(self, model, processor, batch_size: int, set_name: str):
        self.model, self.processor, self.batch_size, self.set_name = model, processor, batch_size, set_name

    def __call__(self, images, prompts, max_new_tokens: int, kind: str) -> list[str]:
        if not prompts:
            return []
        return generate(self.model, self.processor, images, prompts, max_new_tokens=max_new_tokens,
                        batch_size=self.batch_size, desc=f"{self.set_name} {kind}")


def few_shot_examples(profiles: list[Profile], i: int, j: int, n: int) -> list[tuple[str, dict, str]]:
    """Worked examples for item j of profile i: item j of the next n other profiles (module doc)."""
    shots = []
    for step in range(1, len(profiles)):
        if len(shots) >= n:
            break
        other = profiles[(i + step) % len(profiles)]
        if other.choices:
            c = other.choices[j % len(other.choices)]
            shots.append((c.question, c.options, c.correct))
    return shots


def _multiple_choice(run, profiles, images, few_shot, new_tokens):
    items = [(i, j, p, c) for i, p in enumerate(profiles) for j, c in enumerate(p.choices)]
    prompts = [multiple_choice_prompt(c.question, c.options, few_shot_examples(profiles, i, j, few_shot))
               for i, j, _, c in items]
    answers = run([images[i] for i, *_ in items], prompts, new_tokens, "mc")
    rows = []
    for (_, _, p, c), answer in zip(items, answers):
        letter = metrics.parse_choice_letter(answer)
        scores = {"parsed": letter, "correct": letter == c.correct.strip().upper()}
        rows.append(sample_row(run.set_name, p.id, "mc", c.question, c.correct, answer, scores, c.kind))
    share = {kind: mean(r["scores"]["correct"] for r in rows if kind in (None, r["type"]))
             for kind in (None, "image", "text")}
    return {"mc_acc": share[None], "mc_acc_image": share["image"], "mc_acc_text": share["text"]}, rows


def _generation(set_name, items, answers, vocabulary, classifier):
    """Scores of the greedy answers to the open-generation items (profile index, profile, item)."""
    coherent = _coherent(answers, vocabulary, classifier)
    rows = []
    for (_, p, g), answer, ok in zip(items, answers, coherent):
        scores = {**metrics.rouge_scores(answer, g.ground_truth),
                  "bleu": metrics.bleu_score(answer, g.ground_truth), "coherent": ok}
        rows.append(sample_row(set_name, p.id, "gen", g.question, g.ground_truth, answer, scores, g.kind))
    names = (*metrics.ROUGE_TYPES, "bleu", "coherent")
    means = {name: mean(r["scores"][name] for r in rows) for name in names}
    means["coherence"] = means.pop("coherent")
    return means, rows


def _coherent(answers: list[str], vocabulary, classifier) -> list[bool]:
    if not answers:
        return []
    if classifier is not None:
        return metrics.classifier_coherence(answers, classifier)
    return [metrics.is_coherent(a, vocabulary) for a in answers]


def _cloze(run, profiles, images, max_new_tokens):
    items = [(i, p, g) for i, p in enumerate(profiles) for g in p.cloze]
    answers = run([images[i] for i, *_ in items], [cloze_prompt(g.question) for *_, g in items],
                  max_new_tokens, "cloze")
    rows = [sample_row(run.set_name, p.id, "cloze", g.question, g.ground_truth, answer,
                    {"correct": metrics.cloze_correct(answer, g.ground_truth)}, g.kind)
            for (_, p, g), answer in zip(items, answers)]
    return mean(r["scores"]["correct"] for r in rows), rows


def _fact_metrics(fact: dict) -> dict:
    """fact_acc, fact_acc_image, fact_acc_text of factcheck's result ({}: the fact task was not run)."""
    return {f"fact_{key}": _finite(fact.get(key)) for key in ("acc", "acc_image", "acc_text")}


def _finite(value) -> float | None:
    # JSON has no NaN; a missing metric is null, which report reads back as NaN.
    return None if value is None or math.isnan(value) else float(value)


# ------------------------------------------------------------- a run

def evaluate(model: ModelConfig, data: DataConfig, settings: EvalConfig, *, adapter=None, method: str = "Vanilla",
             setting: dict | None = None, budget: float = 0, seed: int = 0, cache_fingerprint: str = "",
             results_path=None, samples_path=None, relearn: RelearnConfig | None = None, relearn_reference: str = "",
             config: dict | None = None, attacks: dict | None = None) -> dict:
    """Evaluate model.path (+ `adapter`) on the sets of `settings`; append its row to the results file and return it.

    The model, data and evaluation settings come as their config sections
    (model, data, evaluate), so that every key of them reaches this function
    whoever calls it; `method`, `setting`, `budget`, `seed` and
    `cache_fingerprint` describe the run the row is about, `config` (the
    resolved configuration, jobs.runs.config_record) is recorded in the row.
    `results_path` overrides settings.results (the demo and the study keep
    their own files).

    Membership inference (settings.mia: auto | on | off; pipeline/evaluation/mia.py)
    scores the forget split's QA against settings.mia_split's never-trained
    people; with settings.gold (a model trained without the forget people) it
    adds PrivLeak per attack: metrics["mia"]. `relearn` (the relearn section)
    runs the relearning attack last, on this very model, against the accuracy
    of `relearn_reference` (default: model.path, the vanilla model an adapter
    was trained from): metrics["relearn"]. `attacks` ({name: summary}, e.g. jobs.runs.attack_metrics'
    logit_lens, probe, quantize) are recorded in the row's metrics as they are.

    settings.protocol "official" scores as MLLMU-Bench's eval.py does
    (protocol_mllmu: its prompts, few-shot profiles drawn with settings.seed from
    settings.few_shot_split, text-only items without the image, Test_Set
    pictures drawn at random or all); "viker" is this module's own protocol
    (module doc). CLEAR is evaluated by clear_eval.evaluate_clear.
    """
    e, model_dir, data_root = settings, model.path, data.root
    forget_split, retain_split, benchmark = data.forget_split, data.retain_split, data.benchmark
    dtype, device = model.dtype, model.device
    if check_benchmark(benchmark) == "clear":
        # CLEAR has its own protocol and row layout; callers pick clear_eval.evaluate_clear (jobs.runs does),
        # so that this module and clear_eval do not import each other.
        raise DataError("benchmark clear is evaluated by clear_eval.evaluate_clear, not evaluate.evaluate")
    names = parse_sets(e.sets)
    tasks = parse_tasks(e.tasks)
    protocol = check_protocol(e.protocol)
    pairs = default_splits(benchmark, forget_split) if not (data.test_split and data.real_split) else {}
    dropped: list = []
    chosen = eval_sets(data_root, forget_split, retain_split, data.test_split or pairs["test"],
                       data.real_split or pairs["real"], names=names, benchmark=benchmark,
                       dropped=dropped)   # bad data fails before the model loads
    nonmembers, mia_note = membership_split(data_root, e.mia, e.mia_split, benchmark)
    shots = official_shot_source(data_root, e.few_shot_split) if protocol == "official" else {}
    classifier = load_coherence_classifier(e.coherence_classifier, device) if e.coherence_classifier else None
    vocabulary = None if classifier else benchmark_vocabulary(data_root)
    loaded, processor = load_for_eval(model_dir, adapter, dtype, device)
    results, samples, scored = {}, [], {}
    for name in tqdm(names, desc="evaluate"):
        profiles, other_images = chosen[name]
        set_tasks = tasks if name in e.gen_sets else tuple(t for t in tasks if t != "gen")
        if e.max_profiles:      # a fixed subset (the first N) keeps quick sweeps comparable across runs
            profiles = profiles[:e.max_profiles]
        scored[name] = profiles
        if protocol == "official":
            results[name], rows = evaluate_profiles_official(
                loaded, processor, profiles, other_images, shots, set_name=name, seed=e.seed,
                test_images=e.test_images, max_new_tokens=e.max_new_tokens, batch_size=e.batch_size,
                tasks=set_tasks)
        else:
            results[name], rows = evaluate_profiles(
                loaded, processor, profiles, other_images, few_shot=e.few_shot, max_new_tokens=e.max_new_tokens,
                batch_size=e.batch_size, vocabulary=vocabulary, classifier=classifier, set_name=name,
                likelihood=name in e.likelihood_sets,
                tasks=set_tasks)
        samples += rows
    to_gold = bool(e.gold and e.gold_distance)
    members = read_profiles(data_root, forget_split, benchmark) if nonmembers or to_gold or relearn is not None else []
    if nonmembers:
        results["mia"], rows = membership_metrics(loaded, processor, members, nonmembers, e.mia_k, e.batch_size,
                                                  e.gold, memo_key(data_root, forget_split, e.mia_split, e.mia_k),
                                                  dtype, device)
        samples += rows
    if to_gold:
        results["gold_distance"], rows = gold_distance_metrics(loaded, processor, members, e.gold,
                                                               memo_key(data_root, forget_split), dtype, device,
                                                               e.batch_size)
        samples += rows
    if relearn is not None:      # last: the attack trains this model in place
        results["relearn"] = relearn_metrics(loaded, processor, members, relearn, relearn_reference or model_dir,
                                             memo_key(data_root, forget_split), dtype, device, e.batch_size)
    results.update(attacks or {})
    results_path = Path(results_path or e.results)
    samples_path = Path(samples_path) if samples_path else default_samples_path(results_path, method, forget_split,
                                                                               budget, seed)
    row = {
        "method": method, "protocol": protocol, "forget_split": forget_split,
        "retain_split": retain_split or default_splits(benchmark, forget_split)["retain"],
        "setting": dict(setting or {}), "budget": budget, "seed": seed,
        "model": str(model_dir), "adapter": None if adapter is None else str(adapter),
        "cache_fingerprint": cache_fingerprint,
        "coherence_kind": f"classifier: {e.coherence_classifier}" if classifier else metrics.COHERENCE_LABEL,
        "bleu_note": metrics.BLEU_NOTE,
        "data_root": str(data_root), "few_shot": e.few_shot, "max_new_tokens": e.max_new_tokens,
        "mc_new_tokens": MC_NEW_TOKENS, "samples": str(samples_path), "tasks": list(tasks),
        # What was scored: the profiles after max_profiles, and per task the items asked (0: task not run).
        "n_items": {name: _scored_counts(scored[name], [r for r in samples if r.get("set") == name],
                                         chosen[name][1], tasks) for name in names},
        "metrics": results,
        # Forget and retain training QA the reader left out for their content (records.Dropped).
        "dropped": [d.as_dict() for d in dropped],
    }
    if config is not None:
        row["config"] = config
    if mia_note:
        row["mia_note"] = mia_note
    if nonmembers:
        from .mia import ATTACKS, FIXED_ATTACK
        row.update(mia_split=e.mia_split, mia_k=e.mia_k, gold=e.gold or None,
                   mia_attack=FIXED_ATTACK, mia_best_of_4_attack=ATTACKS[int(results["mia"]["best_of_4_attack"])])
    if protocol == "official":
        from .protocol_mllmu import BLEU_NOTE as OFFICIAL_BLEU_NOTE, item_counts as official_item_counts
        # n_items: the items scored (after max_profiles, without the shot profiles' questions), per task.
        row.update(protocol_id=PROTOCOL_ID, eval_seed=e.seed, test_images=e.test_images,
                   few_shot_split=e.few_shot_split, mc_new_tokens=OFFICIAL_MC_NEW_TOKENS, few_shot=None,
                   bleu_note=OFFICIAL_BLEU_NOTE,
                   n_items={name: {**official_item_counts(scored[name], [r for r in samples if r.get("set") == name]),
                                   "fact": fact_count(scored[name], chosen[name][1]) if "fact" in tasks else 0}
                            for name in names})
    write_jsonl(samples_path, samples)
    append_result(results_path, row)
    return row


# --------------------------------------------------- attacks: membership, relearning

MIA_MODES = ("auto", "on", "off")


def membership_split(data_root, mode: str, split: str, benchmark: str = "mllmu") -> tuple[list[Profile], str]:
    """(non-member profiles, a note when membership inference is not run), checked before the model loads.

    MLLMU-Bench ships no split of people its vanilla model never saw (ft_Data
    holds every fictitious profile, Test_Set the same people on other pictures),
    so `auto` runs only where `split` exists: the miniature benchmark's Holdout_Set.
    """
    mode = str(mode).strip().lower()
    if mode not in MIA_MODES:
        raise DataError(f"evaluate.mia is one of: {', '.join(MIA_MODES)}; got {mode!r}")
    if mode == "off":
        return [], "membership inference off (evaluate.mia=off)"
    if not (Path(data_root) / split).is_dir():
        why = (f"no split '{split}' of never-trained people under {data_root}: membership inference needs "
               f"non-members (evaluate.mia_split; MLLMU-Bench has none, docs/REAL_BENCHMARKS.md)")
        if mode == "on":
            raise DataError(why)
        return [], f"membership inference skipped: {why}"
    return read_profiles(data_root, split, benchmark), ""


def memo_key(*parts) -> str:
    """A memo key for data: the root as an absolute path, then the other parts (split, settings)."""
    return "|".join(str(Path(p).resolve()) if i == 0 else str(p) for i, p in enumerate(parts))


def membership_metrics(model, processor, members, nonmembers, k: float, batch_size: int, gold: str, key: str,
                       dtype: str = "auto", device: str = "auto") -> tuple[dict, list[dict]]:
    """AUC per attack (+ PrivLeak against `gold`, whose AUCs are computed once and kept beside it)."""
    from . import mia
    from pipeline.cache.filememo import remembered
    metrics, rows = mia.membership(model, processor, members, nonmembers, batch_size, k)
    gold_metrics = None
    if gold:
        def compute() -> dict:
            gold_model, gold_processor = load_for_eval(gold, None, dtype, device)
            return mia.membership(gold_model, gold_processor, members, nonmembers, batch_size, k)[0]
        gold_metrics = remembered(Path(gold) / "mia-gold.json", key, compute)
        metrics.update({f"gold_auc_{a}": gold_metrics[f"mia_auc_{a}"] for a in mia.ATTACKS})
    comparison = mia.gold_comparison(metrics, gold_metrics)
    best = comparison.pop("mia_best_of_4_attack")
    metrics.update(comparison, best_of_4_attack=mia.ATTACKS.index(best))   # metrics are numbers: an index into ATTACKS
    samples = [sample_row("mia", r["id"].rsplit("/", 1)[0], "mia", "", "member" if r["member"] else "non-member",
                          "", {a: r[a] for a in mia.ATTACKS}) for r in rows]
    return metrics, samples


def gold_distance_metrics(model, processor, members, gold: str, key: str, dtype: str = "auto", device: str = "auto",
                          batch_size: int = 32) -> tuple[dict, list[dict]]:
    """metrics["gold_distance"]: KL from the gold model's answer distributions on the forget QA (oracle.py).

    The gold model's side is computed once per forget set and kept beside it (gold-answers.json).
    """
    from . import oracle
    from .mia import qa_items
    from pipeline.cache.filememo import remembered
    items = qa_items(members)

    def compute() -> dict:
        gold_model, gold_processor = load_for_eval(gold, None, dtype, device)
        return oracle.gold_answers(gold_model, gold_processor, items, batch_size)
    answers = remembered(Path(gold) / "gold-answers.json", f"{key}|top{oracle.TOP_K}", compute)
    metrics, rows = oracle.distance_to_gold(model, processor, items, answers, batch_size)
    samples = [sample_row("gold_distance", r["id"].rsplit("/", 1)[0], "gold_distance", "", "", "",
                          {k: _finite(r[k]) for k in ("kl", "kl_key", "kl_normal", "n_key", "n")}) for r in rows]
    return {k: _finite(float(v)) for k, v in metrics.items()}, samples


def relearn_metrics(model, processor, members, settings: RelearnConfig, reference_dir, key: str, dtype: str = "auto",
                    device: str = "auto", batch_size: int = 32) -> dict:
    """metrics["relearn"]: the attack on `model` (trained in place) against the reference model's accuracies.

    Numbers only (null for none): recovery (the default cell), worst_recovery with
    worst_lr and worst_steps (the grid's worst cell), people_recovery (the
    held-out-people split), each with its accuracies (pipeline/evaluation/relearn.py).
    """
    from . import relearn
    result = relearn.attack_model(model, processor, members, settings, eval_batch_size=batch_size)
    vanilla = relearn.reference_accuracy(reference_dir, members, settings, key, dtype, device, batch_size)
    return {k: _finite(float(v)) for k, v in relearn.with_recovery(result, vanilla).items()}   # no NaN in JSON


PROTOCOLS = ("official", "viker")


def check_protocol(protocol: str) -> str:
    name = str(protocol).strip().lower()
    if name not in PROTOCOLS:
        raise DataError(f"evaluate.protocol is one of: {', '.join(PROTOCOLS)}; got {protocol!r}")
    return name


def official_shot_source(data_root, split: str) -> dict[str, Profile]:
    """{id: profile} of the few-shot split (eval.py --few_shot_data: Full_Set); the official protocol needs it.

    In the split's row order: the shots follow it (protocol_mllmu.shot_profiles, eval.py :275-277, :513-515).
    """
    if not (Path(data_root) / split).is_dir():
        raise DataError(f"evaluate.protocol official draws its few-shot examples from split '{split}' "
                        f"(MLLMU-Bench eval.py --few_shot_data), not found under {data_root}; "
                        f"set evaluate.few_shot_split or evaluate.protocol=viker")
    return {p.id: p for p in read_split(data_root, split)}


def evaluate_profiles_official(model, processor, profiles: list[Profile], use_other_images: bool,
                               shots: dict[str, Profile], *, set_name: str, seed: int = 0, test_images: str = "random",
                               max_new_tokens: int = 50, batch_size: int = 32, tasks=TASKS):
    """(metrics, rows) of one set by MLLMU-Bench's own protocol, plus viker's fact accuracy.

    The pooled keys of METRIC_KEYS (mc_acc, rouge*, bleu, cloze_acc) stay None: the
    authors report Image_Textual and Pure_Text apart (protocol_mllmu.OFFICIAL_METRIC_KEYS).
    `tasks` (evaluate.tasks) is honoured: a task left out is not asked and its metrics stay None.
    """
    tasks = parse_tasks(tasks, allow_empty=True)
    official, rows = evaluate_official(model, processor, profiles, set_name, shots, use_other_images=use_other_images,
                                       seed=seed, test_images=test_images, max_new_tokens=max_new_tokens,
                                       batch_size=batch_size, tasks=tasks)
    fact = (fact_accuracy(model, processor, profiles, held_out=use_other_images, batch_size=batch_size,
                          desc=f"{set_name} fact") if "fact" in tasks else {})
    result = {key: None for key in METRIC_KEYS}
    result.update(official, mc_acc_image=official["mc_acc_image"], mc_acc_text=official["mc_acc_text"],
                  **_fact_metrics(fact))
    return result, rows


def parse_sets(sets) -> list[str]:
    names = [s.strip() for s in sets.split(",")] if isinstance(sets, str) else list(sets)
    unknown = [s for s in names if s not in SET_NAMES]
    if unknown or not names:
        raise ValueError(f"unknown evaluation set(s) {unknown or names}: choose from {', '.join(SET_NAMES)}")
    return names


def _scored_counts(profiles: list[Profile], rows: list[dict], other_images: bool, tasks) -> dict[str, int]:
    """n_items of a viker row: the set's profiles as scored and, per task, the items asked (0: not run).

    Generated and likelihood tasks count their per-sample rows (one per item scored);
    fact rows are only examples, so fact counts factcheck's items.
    """
    kinds = ("mc", "gen", "cloze", "mc_ll", "cloze_ll")
    counts = {"profiles": len(profiles), **{kind: sum(r.get("kind") == kind for r in rows) for kind in kinds}}
    counts["fact"] = fact_count(profiles, other_images) if "fact" in tasks else 0
    return counts


def _counts(profiles: list[Profile]) -> dict[str, int]:
    return {"profiles": len(profiles), "mc": sum(len(p.choices) for p in profiles),
            "gen": sum(len(p.generation) for p in profiles), "cloze": sum(len(p.cloze) for p in profiles)}


def default_samples_path(results_path: Path, method: str, forget_split: str, budget, seed) -> Path:
    # The forget split is in the name: one results file usually holds several splits' runs.
    # The method is a display label ('ViKeR λ=0.5'): file names get its ASCII slug ('viker-lam0.5').
    return results_path.parent / f"samples-{file_slug(method)}-{forget_split}-{budget}-{seed}.jsonl"


# ------------------------------------------------------------- display

_SHOWN = (("MC", "mc_acc"), ("MC img", "mc_acc_image"), ("MC txt", "mc_acc_text"), ("R-1", "rouge1"),
          ("R-2", "rouge2"), ("R-L", "rougeL"), ("BLEU", "bleu"), ("cloze", "cloze_acc"), ("fact", "fact_acc"),
          ("coher.", "coherence"), ("MC-LL", "mc_ll_acc"), ("clz-LL", "cloze_ll_acc"))


# The official protocol reports Image_Textual (img) and Pure_Text (txt) apart.
_SHOWN_OFFICIAL = (("MC img", "mc_acc_image"), ("MC txt", "mc_acc_text"), ("cz img", "cloze_acc_image"),
                   ("cz txt", "cloze_acc_text"), ("R-L img", "rougeL_image"), ("R-L txt", "rougeL_text"),
                   ("BLEU img", "bleu_image"), ("BLEU txt", "bleu_text"), ("fact", "fact_acc"))


def format_row(row: dict) -> str:
    """The row's metrics as a small table, percentages per set."""
    head = f"{row['method']} on {row['forget_split']} (budget {row['budget']}, seed {row['seed']})"
    shown = _SHOWN_OFFICIAL if row.get("protocol") == "official" else _SHOWN
    lines = [head, f"{'set':8s}" + "".join(f"{label:>8s}" for label, _ in shown)]
    for name, values in row["metrics"].items():
        if name not in ("mia", "relearn"):
            lines.append(f"{name:8s}" + "".join(_cell(values.get(key)) for _, key in shown))
    lines.append(f"coherence: {row['coherence_kind']}")
    lines += format_attacks(row)
    return "\n".join(lines)


def format_attacks(row: dict) -> list[str]:
    """The membership-inference and relearning lines of a row (none when they did not run)."""
    from .mia import ATTACKS, FIXED_ATTACK as a
    m, lines = row["metrics"], []
    if "mia" in m:
        x = m["mia"]
        others = ", ".join(f"{b} {x[f'mia_auc_{b}']:.3f}" for b in ATTACKS if b != a)
        ou = x.get(f"privleak_ou_{a}")     # None (null) for a gold AUC of 1: 1 - g = 0
        leak = (f"; PrivLeak {x[f'privleak_{a}']:+.1f}% (viker: 100(AUC-g)/g), "
                f"{'undefined' if ou is None else f'{ou:+.1f}%'} (OpenUnlearning/MUSE: 100(g-AUC)/(1-g)) vs gold"
                if f"privleak_{a}" in x else " (no gold model)")
        lines.append(f"membership AUC ({x['n_members']:g} forget QA vs {x['n_nonmembers']:g} never-trained), "
                     f"{a}: {x[f'mia_auc_{a}']:.3f}{leak}; other attacks (diagnostic): {others}")
    elif row.get("mia_note"):
        lines.append(row["mia_note"])
    if "relearn" in m:
        from .relearn import format_attack
        lines.append(format_attack(m["relearn"], "relearning attack"))
    return lines


def _cell(value) -> str:
    return f"{'-':>8s}" if value is None else f"{100 * value:7.1f}%"
