"""Span-aware references (precompute.span chain): spans read from the answer, the chain rule, the demo's leak closed."""
import dataclasses
import json

import numpy as np
import pytest
import torch

from pipeline.cache.refcache import RefCacheReader
from pipeline.config import PrecomputeConfig, load_config
from pipeline.data.mini import make_mini
from pipeline.data.mllmu import read_split
from pipeline.data.records import forget_samples
from pipeline.jobs import prebuilt
from pipeline.models.modeling import load_processor
from pipeline.stage1 import precompute as pc
from pipeline.stage1.spans import answer_pieces, chain_spans, span_starts
from pipeline.stage2.inputs import cache_setting_differences


def test_spans_follow_words_and_capitalised_names():
    pieces = ["This", " person", " is", " named", " E", "l", "i", "o", " Lund", "."]
    assert span_starts(pieces) == [0, 1, 2, 3, 4, 4, 4, 4, 4, 9]
    # a year in pieces is one span; a lower-case word after a name opens its own
    assert span_starts([" Ilse", " Fallow", " was", " born", " in", " 19", "75", "."]) == [0, 0, 2, 3, 4, 5, 5, 7]
    # a capitalised word after a lower-case word is a new fact, not the same one
    assert span_starts([" in", " Brno"]) == [0, 1]
    assert span_starts(["", " Brno", ""]) == [0, 1, 2]     # special tokens decode to nothing: their own spans


def test_pieces_rebuild_the_answer_with_its_spaces():
    processor = load_processor(prebuilt.SHIPPED / "vanilla")
    tok = processor.tokenizer
    prompt = tok.encode("Question: who? Answer:")
    answer = tok.encode(" This person is named Elio Lund.", add_special_tokens=False)
    ids = prompt + answer
    pieces = answer_pieces(tok, ids, len(prompt))
    assert len(pieces) == len(answer)
    assert "".join(pieces) == tok.decode(answer, skip_special_tokens=True)
    starts = span_starts(pieces)
    name = [t for t, p in enumerate(pieces) if p.strip() and p.strip() in "Elio Lund"]
    assert len({starts[t] for t in name}) == 1, (pieces, starts)    # the whole name is one span


def test_chain_against_hand_computed_values():
    probs = torch.tensor([[0.1, 0.6, 0.2, 0.1],      # span opener: true token 0, p=0.1
                          [0.05, 0.05, 0.8, 0.1],    # same span: true token 2, p=0.8 -> 0.1*0.8
                          [0.5, 0.25, 0.25, 0.0],    # same span: true token 0, p=0.5 -> 0.08*0.5
                          [0.9, 0.05, 0.05, 0.0]])   # its own span: unchanged
    out = chain_spans(probs, [0, 2, 0, 0], [0, 0, 0, 3])
    torch.testing.assert_close(out[0], probs[0])
    torch.testing.assert_close(out[3], probs[3])
    assert out[1, 2].item() == pytest.approx(0.08)
    # the other tokens keep their shape, scaled to fill 1 - p'
    scale = (1 - 0.08) / (1 - 0.8)
    torch.testing.assert_close(out[1, [0, 1, 3]], probs[1, [0, 1, 3]] * scale)
    assert out[2, 0].item() == pytest.approx(0.04)
    torch.testing.assert_close(out.sum(-1), torch.ones(4))
    # all the mass on the true token: what is freed is spread evenly
    sure = chain_spans(torch.tensor([[0.5, 0.5, 0.0], [0.0, 1.0, 0.0]]), [0, 1], [0, 0])
    torch.testing.assert_close(sure[1], torch.tensor([0.25, 0.5, 0.25]))
    with pytest.raises(ValueError, match="spans for 1 tokens"):
        chain_spans(probs, [0, 2, 0, 0], [0])


@pytest.fixture(scope="module")
def demo_names(tmp_path_factory):
    """The demo's world and shipped vanilla model; the forget samples whose answer is the person's name."""
    root = tmp_path_factory.mktemp("demo-world") / "mini"
    make_mini(root, load_config("configs/demo.yaml").mini)
    samples = [s for s in forget_samples(read_split(root, "forget_10")) if "name of this person" in s.question]
    assert len(samples) >= 4
    return root, samples


def _name_token_probs(cache, samples, tok):
    """Per name answer: the true token's reference probability over the name's tokens (opener first)."""
    out = []
    with RefCacheReader(cache) as reader:
        for s in samples:
            ref = reader.get(s.sample_id)
            ids = ref.answer_ids.tolist()
            pieces = answer_pieces(tok, ids, 0)
            starts = span_starts(pieces)
            opener = next(t for t, p in enumerate(pieces) if p.strip() and p.strip()[0].isupper() and t > 0)
            span = [t for t in range(len(ids)) if starts[t] == opener]
            true = [float(ref.topk_prob[t][list(ref.topk_idx[t]).index(ids[t])])
                    if ids[t] in ref.topk_idx[t] else 0.0 for t in span]
            out.append(true)
    return out


def test_the_demo_caches_name_leak_and_the_chain_that_closes_it(demo_names, tmp_path):
    """The cache diagnostic: plain references complete a forget person's name once given its first token;
    chained ones never make a later name token likelier than the first."""
    root, samples = demo_names
    model = prebuilt.SHIPPED / "vanilla"
    tok = load_processor(model).tokenizer
    caches = {}
    for span in ("none", "chain"):
        settings = PrecomputeConfig(output=str(tmp_path / span), k=5, top_k=32, seed=0, span=span)
        pc.precompute(str(model), samples, settings, pool_dir=str(root / "pools" / "people"), device="cpu",
                      log=lambda *_: None)
        caches[span] = _name_token_probs(tmp_path / span, samples, tok)
    plain, chained = caches["none"], caches["chain"]
    multi = [i for i, p in enumerate(plain) if len(p) > 1]
    assert len(multi) >= 3
    later = [p for i in multi for p in plain[i][1:]]
    # the leak: the name's first token is uncertain, its later tokens are not
    assert np.mean([plain[i][0] for i in multi]) < 0.2 and np.mean(later) > 0.5
    for i in multi:
        assert chained[i][0] == pytest.approx(plain[i][0], abs=1e-3)            # the opener is the paper's R
        assert all(p <= chained[i][0] + 1e-3 for p in chained[i][1:]), (plain[i], chained[i])
    settings = {s: json.loads((tmp_path / s / "manifest.json").read_text()) for s in caches}
    assert settings["chain"]["settings"]["span"] == "chain"
    assert settings["chain"]["fingerprint"]["parts"]["span"] == "chain"
    assert "span" not in settings["none"]["fingerprint"]["parts"]     # older caches keep their fingerprint
    assert settings["chain"]["fingerprint"]["digest"] != settings["none"]["fingerprint"]["digest"]


def test_training_refuses_a_cache_made_with_another_span():
    made = {"k": 5, "K": 32, "seed": 0, "reference": "pool"}        # a cache from before span-aware references
    want = {"k": 5, "K": 32, "seed": 0, "reference": "pool", "span": "chain"}
    assert cache_setting_differences(made, {}, want, None) == ["precompute.span (config chain, cache none)"]
    assert cache_setting_differences({**made, "span": "chain"}, {}, want, None) == []
    assert cache_setting_differences(made, {}, {**want, "span": "none"}, None) == []
    with pytest.raises(Exception, match="precompute.span"):
        load_config(None, ["precompute.span=first"])
    assert dataclasses.replace(PrecomputeConfig(), span="chain").span == "chain"
