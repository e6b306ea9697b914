"""Stage two, `viker train`: LoRA unlearning streamed from the cache, and the knowledge injection before it.

Owns the training recipe (`train`: setup -> loop -> save), what the loop
reads (`inputs`: tokenised examples, the cache opened and checked against
the run), in which order and how it is batched (`stream`: seeded shuffles,
the DataLoader, reference padding), each method and its loss (`methods`,
a module a method and their registry, built from the small loss functions
in `losses`), what a run writes
(`checkpoint`: the adapter published atomically, checkpoints, resume), the
errors it raises (`errors`), method names and labels (`labels`) and the
fine-tuning that makes the vanilla and gold models (`finetune`, whose
`teach` loop the relearning attack reuses).

May import: `pipeline.stage1` (its tokenisation and the reference draw,
for online ViKeR), `pipeline.cache`, `pipeline.config`, `pipeline.models`,
`pipeline.data` and below. Never evaluation or a job.
"""
