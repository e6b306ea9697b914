"""Span-aware references (precompute.span chain): a fact the reference cannot start, it cannot finish either.

ViKeR's reference R_t is teacher-forced: the frozen model sees an irrelevant
picture, the question and the ground-truth answer up to t. For a fact of one
token that is what the method wants: R says what the model answers when it
does not know who is pictured. A fact of several tokens is different. Its
first token is uncertain under R (the reference does not know the name), but
the later tokens are conditioned on the true first one, and given " Ilse" the
reference completes " Fallow" (0.87 on the demo's cache; " E|l|i|o| Lund":
0.00, 0.93, 0.79, 0.96, 0.86). The regulariser then holds the model to
"Ilse -> Fallow" while the forget loss removes "Ilse": the rest of the fact is
kept.

What the reference model would actually say about a stranger is its own
continuation, not the true one: it reaches the true t-th token of a fact only
if it produced the true tokens before it. With R_u's true-token probability
p_u, the probability of the reference producing the fact's true tokens
s..t-1 is c_t = prod_{u=s}^{t-1} p_u. Assuming a continuation of another
prefix ("Emma ...", not "Elio ...") never leads back to the true token (within
one fact it spells another name), the reference's probability of the true
token at t, marginalised over its own prefix, is

    p'_t = c_t * p_t                 (chain; p'_s = p_s for the fact's first token)

and the rest of R_t keeps its shape: every other token is scaled by
(1 - p'_t) / (1 - p_t), so R'_t sums to one and is R_t where the reference
did produce the true prefix. p'_t <= p_s: no later token of a fact is more
certain than its first. Tokens outside facts are left alone: after "born in
Brno" or "born in Prague" the next word is " and" either way, so the chain's
assumption does not hold there, and a span of one token is never changed.

Fact spans are read from the answer's text, the same way for every tokenizer:
each token's piece is what it adds to the decoded answer (decoding the prefix
up to it and subtracting, so SentencePiece's dropped leading space is not
lost). A token continues the current span when its piece starts without a
space and with a letter or digit (the rest of a word: "l", "87"), or when it
starts a capitalised word right after a capitalised word ("Ilse| Fallow",
"New| York"); any other token opens a span. The benchmark's facts are names,
places, jobs and years: one word, or capitalised words in a row.
"""
from __future__ import annotations

import torch


def answer_pieces(tokenizer, ids: list[int], start: int) -> list[str]:
    """The text each answer token (ids[start:]) adds to the decoded answer."""
    ids = [int(i) for i in ids]
    pieces, before = [], ""
    for t in range(start, len(ids)):
        text = tokenizer.decode(ids[start:t + 1], skip_special_tokens=True)
        pieces.append(text[len(before):] if text.startswith(before) else text)
        before = text
    return pieces


def _capitalised(piece: str) -> bool:
    word = piece.lstrip()
    return bool(word) and word[0].isupper()


def span_starts(pieces: list[str]) -> list[int]:
    """For each token, the position of the first token of its span (itself when it opens one)."""
    starts: list[int] = []
    for t, piece in enumerate(pieces):
        if t > 0 and piece:
            inside_word = not piece[0].isspace() and piece[0].isalnum() and pieces[t - 1][-1:].isalnum()
            # " Fallow" after " Ilse": a capitalised word after a capitalised word of the same span
            name_goes_on = (piece[0] == " " and _capitalised(piece)
                            and _capitalised(pieces[starts[t - 1]]) and pieces[t - 1][-1:].isalpha())
            if inside_word or name_goes_on:
                starts.append(starts[t - 1])
                continue
        starts.append(t)
    return starts


def chain_spans(probs: torch.Tensor, true_ids, starts: list[int]) -> torch.Tensor:
    """R' from R [T, V]: each later token of a span gets p'_t = p_t * prod of the span's earlier p_u.

    `true_ids` [T]: the answer's tokens; `starts`: span_starts of the answer.
    The other tokens of R_t are rescaled to keep the sum at one; where R_t put
    all its mass on the true token, the freed mass is spread evenly.
    """
    T, V = probs.shape
    if len(starts) != T or len(true_ids) != T:
        raise ValueError(f"spans for {len(starts)} tokens and {len(true_ids)} answer ids, distributions for {T}")
    ids = torch.as_tensor(list(true_ids), dtype=torch.long, device=probs.device)
    p = probs.gather(1, ids[:, None])[:, 0].to(torch.float64)
    out = probs.clone()
    carried = torch.ones((), dtype=torch.float64, device=probs.device)
    for t in range(T):
        if starts[t] == t:
            carried = p[t].clone()
            continue
        new = carried * p[t]
        rest = 1.0 - p[t]
        row = probs[t].to(torch.float64)
        if rest > 1e-12:
            row = row * ((1.0 - new) / rest)
        else:
            row = torch.full_like(row, float((1.0 - new) / (V - 1)))
        row[ids[t]] = new
        out[t] = row.to(probs.dtype)
        carried = new
    return out
