"""What reaches a terminal or a log: progress bars on a terminal only, plain lines in files and pipes,
escaped names, one bounded error line."""
from __future__ import annotations

import io
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from helpers import console
REPO = Path(__file__).resolve().parents[1]


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_control_characters_are_escaped_and_the_rest_kept():
    assert console.safe_text("photo été 日本.jpg") == "photo été 日本.jpg"
    assert console.safe_text("a\x1b[2Jb\x07\rc\udcff\u202e") == "a\\x1b[2Jb\\x07\\rc\\udcff\\u202e"


def test_one_line_is_bounded_and_takes_a_workers_original_message():
    assert console.one_line(ValueError("x" * 5000)).endswith("(4000 more characters)")
    worker = RuntimeError("Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call "
                          "last):\n  File ...\ndataset.DataError: image file a.jpg is empty")
    assert console.one_line(worker) == "image file a.jpg is empty"
    assert console.one_line(ValueError("two\nlines\x1b")) == "two lines\\x1b"


def test_a_log_gets_plain_lines_and_a_terminal_a_bar(monkeypatch):
    log = io.StringIO()
    for _ in console.progress(range(50), desc="train 0", unit="batch", stream=log):
        pass
    assert log.getvalue() == "train 0: 50/50 batch (100%), 0 s\n" and "\r" not in log.getvalue()
    ticks = iter(range(0, 1000, 11))  # 11 s per step: a long loop gets a line every 10%
    monkeypatch.setattr(console.time, "monotonic", lambda: next(ticks))
    log = io.StringIO()
    with console.progress(total=20, desc="check", unit="img", stream=log) as bar:
        for _ in range(20):
            bar.update(1)
    lines = log.getvalue().splitlines()
    assert 8 <= len(lines) <= 11 and lines[-1].startswith("check: 20/20 img (100%)")
    terminal = Terminal()
    for _ in console.progress(range(3), desc="eval", stream=terminal):
        pass
    assert "\r" in terminal.getvalue()
    quiet = io.StringIO()
    for _ in console.progress(range(3), desc="eval", stream=quiet, enabled=False):
        pass
    assert quiet.getvalue() == ""


def test_warnings_become_one_escaped_line(capsys):
    with console.warnings_as_lines("predict.py", always=UserWarning):
        warnings.warn("folder a\x1bb holds no images", UserWarning)
        warnings.warn("folder a\x1bb holds no images", UserWarning)
    assert capsys.readouterr().err == "predict.py: warning: folder a\\x1bb holds no images\n" * 2


@pytest.mark.slow
def test_a_demo_run_logged_to_a_file_holds_no_carriage_returns(demo_root, tmp_path):
    """stdout and stderr redirected to a file, as NNI's trial log or `> log` does."""
    script = ("import sys, main_nni\nfrom reliability_helpers import TinyTANet\nmain_nni.TANet = TinyTANet\n"
              "sys.exit(main_nni.main(sys.argv[1:]))")
    log = tmp_path / "trial.log"
    with open(log, "w") as f:
        done = subprocess.run([sys.executable, "-c", script, "--dataset", "demo", "--demo_images", "48", "16",
                               "--path_to_save_csv", str(demo_root), "--batch_size", "4", "--num_epoch", "2",
                               "--num_workers", "0", "--device", "cpu", "--no_report", "--experiment_dir_name",
                               str(tmp_path / "run")], cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                              env={**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}"}, timeout=300)
    text = log.read_text()
    assert done.returncode == 0, text[-2000:]
    assert "\r" not in text and "\r" not in (tmp_path / "run" / "train.log").read_text()
    assert "train 1: " in text and "epoch 2/2" in text  # a line per loop, and the epoch summaries
