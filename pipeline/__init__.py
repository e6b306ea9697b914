"""viker: machine unlearning for multimodal LLMs (stage one, the cache, stage two, evaluation).

Importing the package does no work: the OpenMP thread policy is decided by the entry points
(pipeline/threads.py).
"""
