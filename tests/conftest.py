"""Shared test setup: no test may reach a hub, and slow/GPU tests are opt-in."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

# Tests never read or write the user's hash memo (pipeline/cache/filememo.py).
import tempfile  # noqa: E402

os.environ.setdefault("VIKER_HASH_MEMO", os.path.join(tempfile.mkdtemp(prefix="viker-memo-"), "file-hashes.json"))
