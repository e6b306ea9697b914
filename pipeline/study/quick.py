"""`viker study --quick`: the CI-sized grid, as overrides (a module without imports: the CLI reads it first)."""

# CI-sized grid: the machinery end to end (three draws, reuse, selection, report) in minutes.
QUICK = ("mini.n_fictitious=10", "mini.n_real=2", "mini.n_holdout=4", "mini.train_images=1", "mini.test_images=1", "mini.pool_size=6",
         "finetune.steps=40", "finetune.batch_size=8", "finetune.gate_min_acc=0", "finetune.warmup_steps=5",
         "tiny.vocab_size=400", "tiny.vision_hidden=32", "tiny.vision_layers=1", "tiny.text_hidden=32",
         "tiny.text_layers=1", "tiny.text_heads=2", "tiny.max_positions=256", "precompute.k=2",
         "precompute.top_k=8", "evaluate.max_profiles=2", "evaluate.max_new_tokens=8",
         "study.splits=forget_10", "study.seeds=0", "study.methods=ga,viker,viker+nll", "study.budgets=2,4",
         "study.lrs=2e-3", "study.lams=0.5", "study.refs=pets", "study.ks=1", "study.lam_sweep=0.1",
         "study.regularisers=jsd", "study.output=cache/study-quick",
         "study.report=cache/study-quick/STUDY.md")
