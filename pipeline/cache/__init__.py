"""The reference cache between the stages: its on-disk format, its fingerprint, and tools to look into it.

Owns the HDF5 shard format, its writer, reader and verifier (`refcache`,
the one module that knows the format), what a cache was made from
(`fingerprint`: model weights, tokenizer, prompt template, forget set, pool),
`viker cache inspect|show` (`view`) and the file-hash memo that keeps
fingerprints cheap (`filememo`). It sits *below* stage one: stage one writes
this format and stage two reads it, so it is a contract both import, not a
step of the flow. Nothing here runs a model.

May import: `pipeline.config`, `pipeline.models`, `pipeline.data` and below.
Never stage one, stage two, evaluation or a job.
"""
