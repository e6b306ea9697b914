"""Likelihood-based MC and cloze: exact log-likelihoods on a tiny model, and a planted answer it must find."""
import pytest
import torch
from PIL import Image

from pipeline.evaluation import scoring
from pipeline.data.records import ChoiceItem, GenItem, Profile
from pipeline.models.encoding import encode_pair
from pipeline.models.forward import unwrap
from pipeline.models.modeling import load_model
from pipeline.models.prompts import cloze_prompt, train_prompt
from tests.tiny import make_world, tiny_config


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    _, model_dir = make_world(tmp_path_factory, tiny_config(max_positions=256), n_fictitious=10, pool_size=2,
                              train_images=1, test_images=1)
    return load_model(model_dir, dtype="float32", device="cpu")


def _image(shade):
    return Image.new("RGB", (32, 32), (shade, 40, 90))


def _one_by_one(model, processor, image, prompt, answer):
    """Unbatched float64 reference: log P(answer | image, prompt) from the full logits."""
    ids, start = encode_pair(processor, prompt, " " + answer)
    pix = processor.image_processor(images=[image], return_tensors="pt")["pixel_values"]
    logits = model(input_ids=torch.tensor([ids]), pixel_values=pix).logits[0].double()
    logp = torch.log_softmax(logits, -1)
    return sum(logp[p - 1, ids[p]].item() for p in range(start, len(ids)))


def test_batched_logliks_equal_one_by_one(tiny):
    model, processor = tiny
    items = [(_image(10), train_prompt("Where was this person born?"), "Turin"),
             (_image(200), train_prompt("What does this person do for a living?"), "a baker of bread"),
             (_image(90), cloze_prompt("This person was born in __."), "Cork")]
    got = scoring.answer_logliks(model, processor, items, batch_size=2)   # one padded batch, one single
    want = [_one_by_one(model, processor, *it) for it in items]
    assert got == pytest.approx(want, abs=1e-4)
    assert all(v < 0 for v in got)


@pytest.fixture
def planted(tiny):
    """The tiny model with its LM head replaced: logits = a fixed bias at every position.

    log P(answer) is then sum_t log_softmax(bias)[token_t], computable by hand,
    and raising one token's bias plants the option that contains it.
    """
    model, processor = tiny
    llava = unwrap(model)
    head = llava.lm_head
    vocab = head.weight.shape[0]
    new = torch.nn.Linear(head.weight.shape[1], vocab, bias=True)
    torch.nn.init.zeros_(new.weight)
    torch.nn.init.zeros_(new.bias)
    llava.lm_head = new
    yield model, processor, new.bias
    llava.lm_head = head


def _tokens(processor, prompt, answer):
    ids, start = encode_pair(processor, prompt, " " + answer)
    # The tiny BPE never saw these names: a leading space token, then pieces.
    assert len(ids) - start > 1
    return ids[start:]


def test_planted_option_is_chosen_with_hand_computed_logliks(planted):
    model, processor, bias = planted
    opts = {"A": "Lyon", "B": "Graz", "C": "Cork", "D": "Riga"}
    q = "Where was this person born?"
    toks = {k: _tokens(processor, train_prompt(q), v) for k, v in opts.items()}
    with torch.no_grad():
        bias[toks["C"][1]] = 12.0          # the model "knows" Cork (token 0 is the shared space)
    logp = torch.log_softmax(bias.detach().double(), -1)
    p = Profile(id="p", image=b"", choices=[ChoiceItem(q, opts, "C", "image"), ChoiceItem(q, opts, "A", "text")])
    result, rows = scoring.likelihood_mc(model, processor, [p], [_image(5)], batch_size=3, set_name="forget")
    # Chosen C both times: right on the first item, wrong on the second (whose truth is A).
    assert [r["answer"] for r in rows] == ["C", "C"]
    assert result == {"mc_ll_acc": 0.5, "mc_ll_acc_image": 1.0, "mc_ll_acc_text": 0.0}
    for letter, t in toks.items():
        assert rows[0]["scores"]["loglik"][letter] == pytest.approx(sum(logp[i].item() for i in t), abs=1e-4)


def test_cloze_candidates_and_planted_answer(planted):
    model, processor, bias = planted
    people = [Profile(id=n, image=b"", cloze=[GenItem("This person was born in __.", city, "Image_Textual"),
                                              GenItem(f"{n} works as a __.", "baker", "Pure_Text")])
              for n, city in (("ann", "Lyon"), ("bob", "Cork"), ("cid", "Lyon"))]
    assert scoring.cloze_values(people, 0) == ["Lyon", "Cork"]
    assert scoring.cloze_values(people, 1) == ["baker"]
    # Truth first, then the next values cyclically, four at most.
    assert scoring.cloze_candidates(list("abcdef"), "e") == ["e", "f", "a", "b"]
    assert scoring.cloze_candidates(["Lyon", "Cork"], "Cork") == ["Cork", "Lyon"]
    tok = _tokens(processor, cloze_prompt(people[0].cloze[0].question), "Lyon")
    with torch.no_grad():
        bias[tok[1]] = 12.0
    acc, rows = scoring.likelihood_cloze(model, processor, people, [_image(1)] * 3, set_name="retain")
    # Only the city blanks count (the job blank has one candidate): ann and cid right, bob wrong.
    assert [r["profile"] for r in rows] == ["ann", "bob", "cid"]
    assert [r["scores"]["correct"] for r in rows] == [True, False, True]
    assert acc == pytest.approx(2 / 3)
    assert all(sorted(r["scores"]["candidates"]) == ["Cork", "Lyon"] for r in rows)
