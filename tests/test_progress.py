"""Batch-job hygiene: progress as plain lines off a terminal; ASCII file names."""
import io

from pipeline.evaluation.evaluate import default_samples_path
from pipeline.stage2.labels import file_slug
from pipeline.progress import LogProgress, progress


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_log_progress_writes_one_line_per_interval_and_no_carriage_returns():
    out, clock = io.StringIO(), Clock()
    bar = LogProgress(total=10, desc="train", stream=out, every=30.0, clock=clock)
    for _ in range(10):
        clock.t += 10.0          # 10 s per step: a line at 30, 60, 90 s
        bar.update(1)
    bar.set_postfix(loss="0.500")
    bar.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert lines[0] == "[train] 3/10 (30%) 0.10 it/s, 30s"
    assert len(lines) == 4
    assert lines[-1] == "[train] 10/10 (100%) 0.10 it/s, 100s done loss=0.500"


def test_progress_off_terminal_iterates_everything_and_hides_nested_bars():
    out = io.StringIO()      # StringIO.isatty() is False, like a log file
    assert list(progress(range(3), desc="x", stream=out)) == [0, 1, 2]
    assert out.getvalue() == "[x] 3/3 (100%) " + out.getvalue().split("(100%) ")[1]
    assert out.getvalue().count("\n") == 1
    quiet = io.StringIO()
    assert list(progress(range(3), desc="nested", disable=None, stream=quiet)) == [0, 1, 2]
    assert quiet.getvalue() == ""


def test_file_names_are_ascii_without_spaces(tmp_path):
    assert file_slug("ViKeR λ=0.5") == "viker-lam0.5"
    assert file_slug("ViKeR w/o GA (JS)") == "viker-wo-ga-js"
    path = default_samples_path(tmp_path / "results.jsonl", "ViKeR λ=0.5", "forget_10", 32, 0)
    assert path.name == "samples-viker-lam0.5-forget_10-32-0.jsonl"
    assert path.name.isascii() and " " not in path.name
