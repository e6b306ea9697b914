"""Jobs: where a config becomes stage calls, and the demo that chains every stage.

Owns the edge from a `Config` to each stage's plain arguments (`runs`),
worker processes pinned to one thread each (`workers`), `viker demo`
(`demo`: the miniature benchmark, the tiny vanilla and gold models, stage
one, the unlearning sweep, the report) and the demo's report (`report`:
tables and plots from results rows).

May import: `pipeline.evaluation`, `pipeline.stage2`, `pipeline.stage1`,
`pipeline.cache`, `pipeline.config`, `pipeline.models`, `pipeline.data` and
below. Never the study or the CLI.
"""
