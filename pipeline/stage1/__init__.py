"""Stage one, `viker precompute`: the frozen model over k irrelevant images per forget sample, once.

Owns the precompute loop (`precompute`: encoding, the image-prefix key/value
cache, batched scoring, top-K truncation, resumable sharded output, the
benchmark-image leak check) and the seeded draw of reference images per
sample (`references`), which online ViKeR in stage two repeats exactly.

May import: `pipeline.cache` (the format it writes), `pipeline.config`,
`pipeline.models`, `pipeline.data` and below. Never stage two, evaluation
or a job.
"""
