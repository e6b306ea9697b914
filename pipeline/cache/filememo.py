"""Content hashes of large files, computed once per file version and remembered.

Hashing a 13 GB checkpoint or a 1 GB reference cache in full costs seconds to
tens of seconds (sha256 runs at ~1.3 GB/s on our 2-core machine); doing it at
every `viker train` would be waste. A file whose (real path, size, mtime,
inode) are unchanged is taken to have unchanged content: the first hash is
kept in a small JSON memo and reused. Any write to the file changes its mtime
(or size, or inode when it is replaced), which forces a new hash.

The memo lives at $VIKER_HASH_MEMO, else ~/.cache/viker/file-hashes.json. It
is an optimisation only: a missing, unreadable or unwritable memo just means
hashing again, never an error.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

_BLOCK = 8 << 20
_LOCK = threading.Lock()


def memo_path() -> Path:
    env = os.environ.get("VIKER_HASH_MEMO")
    return Path(env) if env else Path.home() / ".cache" / "viker" / "file-hashes.json"


def hash_file(path, algorithm: str = "sha256") -> str:
    """Plain full-content hex digest (no memo)."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_BLOCK), b""):
            h.update(block)
    return h.hexdigest()


def _key(path: Path, algorithm: str) -> str:
    st = path.stat()
    return f"{algorithm}|{os.path.realpath(path)}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"


def _load(memo: Path) -> dict:
    try:
        data = json.loads(memo.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _store(memo: Path, key: str, digest: str) -> None:
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        with _LOCK:
            data = _load(memo)
            data[key] = digest
            tmp = memo.with_name(f"{memo.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(data, sort_keys=True))
            os.replace(tmp, memo)
    except OSError:
        pass  # read-only home, full disk: the memo is only an optimisation


def memo_file_hash(path, algorithm: str = "sha256") -> str:
    """Full-content digest of `path`, remembered by (real path, size, mtime, inode)."""
    path = Path(path)
    memo = memo_path()
    key = _key(path, algorithm)
    known = _load(memo).get(key)
    if isinstance(known, str):
        return known
    digest = hash_file(path, algorithm)
    # The file may have changed while it was read: remember only a stable version.
    if _key(path, algorithm) == key:
        _store(memo, key, digest)
    return digest


def remembered(store, key: str, compute):
    """compute() once per key, kept in the JSON file `store` (beside the model it describes).

    For values a model gives on fixed data (the gold model's membership AUCs, the
    vanilla model's relearning reference): every run of a sweep needs them, one
    computation serves all. Parallel workers may write at once; each writes a
    whole file and renames it in, so the worst case is computing a value twice.
    The store goes with its model: a rebuilt model (a new folder) starts empty.
    """
    store = Path(store)
    known = _load(store)
    if key not in known:
        value = compute()
        known = {**_load(store), key: value}   # read again: another worker may have added keys meanwhile
        tmp = store.with_name(f"{store.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, store)
    return known[key]
