"""Evaluation, `viker evaluate` and `viker attack`: forgetting, retention and coherence, and the attacks.

Owns the MLLMU-Bench evaluation (`evaluate`: sets, tasks, one results row
per run), its official protocol (`protocol_mllmu`), the metrics (`metrics`:
ROUGE, BLEU, coherence), likelihood scoring (`scoring`), fact accuracy
(`factcheck`), membership inference (`mia`), the attacks (`relearn`,
`quantize`, `logit_lens`, `probe`), CLEAR (`clear_eval`, `clear_official`)
and the results files (`results`).

May import: `pipeline.stage2` (the relearning attack fine-tunes through
`finetune.teach`; rows are labelled with `labels`), `pipeline.cache`
(memoised gold-model numbers), `pipeline.models`, `pipeline.data` and below.
It never trains a model of its own otherwise, and never imports a job.
"""
