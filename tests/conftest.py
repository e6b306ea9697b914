"""Shared test setup: no test may reach a hub, and slow/GPU tests are opt-in."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

# Tests never read or write the user's hash memo (pipeline/cache/filememo.py).
import tempfile  # noqa: E402

os.environ.setdefault("VIKER_HASH_MEMO", os.path.join(tempfile.mkdtemp(prefix="viker-memo-"), "file-hashes.json"))

# The viker command's thread settings for the test process, decided before torch loads: one torch thread
# (the tiny models' ops are too small to share between threads; the `viker` commands tests run in-process
# read VIKER_THREADS too), and the command's OpenMP wait policy (libgomp's default spinning beside other
# busy processes made the suite several times slower on 2 cores).
os.environ.setdefault("VIKER_THREADS", "1")

from pipeline.threads import apply_wait_policy  # noqa: E402

apply_wait_policy()


def pytest_configure(config):
    import torch
    torch.set_num_threads(int(os.environ["VIKER_THREADS"]))
