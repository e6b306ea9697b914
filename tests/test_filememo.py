"""The hash memo: a second hash of an unchanged file is free, a changed file is hashed again."""
import hashlib
import os

from pipeline.cache import filememo


def test_memo_hash_matches_and_follows_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("VIKER_HASH_MEMO", str(tmp_path / "memo.json"))
    f = tmp_path / "w.bin"
    f.write_bytes(b"a" * 1000)
    assert filememo.memo_file_hash(f) == hashlib.sha256(b"a" * 1000).hexdigest()
    assert (tmp_path / "memo.json").is_file()
    calls = []
    monkeypatch.setattr(filememo, "hash_file", lambda *a: calls.append(a) or "x")
    assert filememo.memo_file_hash(f) == hashlib.sha256(b"a" * 1000).hexdigest()   # from the memo
    assert calls == []
    f.write_bytes(b"b" * 1000)                       # same size, new content and mtime
    os.utime(f, ns=(1, 1))
    assert filememo.memo_file_hash(f) == "x" and len(calls) == 1


def test_unwritable_memo_is_not_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("VIKER_HASH_MEMO", "/proc/viker-no-such-dir/memo.json")
    f = tmp_path / "w.bin"
    f.write_bytes(b"abc")
    assert filememo.memo_file_hash(f) == hashlib.sha256(b"abc").hexdigest()
