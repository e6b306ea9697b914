"""The study, `viker study`: every method at matched forgetting over draws, splits and seeds, and its report.

Owns the grid of runs, hyper-parameter selection on a validation draw and
their execution with reuse (`grid`), and the numbers and docs/STUDY.md
written from them (`report`: matched-forgetting tables, areas under curves,
intervals over draws, paired differences, plots). The grid calls the report, never the reverse.

May import: `pipeline.jobs` (the demo's models and the config-to-stage edge)
and every layer below it. Only the CLI imports this package.
"""
