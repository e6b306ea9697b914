"""Models: what a family is, how one is loaded, prompted, tokenised and run, shared by every stage.

Owns the family table (`families`: LLaVA-1.5, LLaVA-NeXT, Qwen2.5-VL,
Idefics3, Gemma 3), loading, tiny test models and LoRA wrapping
(`modeling`), every prompt template (`prompts`), (image, prompt, answer) ->
input ids and pixels (`encoding`), teacher-forced answer logits
(`forward`), batched greedy generation (`generation`), and the process's
place among its peers and its autocast (`distributed`, through accelerate).
No training loop and no cache lives here: these are the building blocks the
stages share.

May import: `pipeline.data` and the layers below it. Never a stage, the
cache, evaluation or a job.
"""
