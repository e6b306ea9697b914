"""Benchmarks: the records every stage passes around, and the readers and writers that make them.

Owns the record types (`records`: Profile, QA, choice and generation items,
forget samples), the MLLMU-Bench parquet reader and writer (`mllmu`), the CLEAR
reader (`clear`), one entry point over both (`loaders`), the miniature
benchmark and its settings (`mini`, `mini_settings`, `portraits`) and `viker data check`
(`check`). Nothing here loads a model or torch.

May import: the package root and `pipeline.progress` only. Every layer above
reads benchmarks through this one; it knows nothing of models, stages or jobs.
"""
