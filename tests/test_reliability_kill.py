"""Nothing lost: a training run SIGKILLed at any moment (also in the middle of writing a checkpoint
or the results) and then resumed with --resume ends exactly like a run that was never interrupted,
and the run folder never holds a half-written file; two runs never share a folder.

The runs are child processes of a forkserver that has imported main_nni once (a fresh interpreter
per run would spend most of the test importing torch). The many-kill test trains a tiny stand-in
for TANet (tests/reliability_helpers.py; the resume machinery does not depend on the model), and
one test does the same with the real TANet.
"""
from __future__ import annotations

import contextlib
import csv
import json
import math
import multiprocessing
import os
import random
import re
import signal
import sys
import time
from multiprocessing import forkserver
from pathlib import Path

import pytest
import torch

import main_nni
from helpers import safe_io
from reliability_helpers import TinyTANet, run_main
from helpers.safe_io import safe_torch_load

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(sys.platform != "linux", reason="SIGKILL and the forkserver: Linux only")]

REPO = Path(__file__).resolve().parent.parent
N_TEST = 4
TINY = ["--dataset", "demo", "--demo_images", "48", "16", "--max_images", str(N_TEST), "--batch_size", "2",
        "--num_epoch", "3", "--num_workers", "0", "--device", "cpu", "--quiet", "--no_report", "--seed", "0"]
TEMP_NAME = re.compile(r"\.(best\.pth|last\.pth|results\.json|test_predictions\.csv)\.[0-9a-f]{12}\.tmp")
PREDICTION_HEADER = ["image", "theme", "true_score", "pred_score"]
JOIN_TIMEOUT = 300  # s; a run that is not killed must finish (a hang fails the test)


@pytest.fixture(scope="module")
def ctx():
    """A forkserver that has imported main_nni: children start in milliseconds.

    There is one forkserver per process: one started earlier (by other code, with other modules
    preloaded) is stopped, and ours is stopped afterwards, so the next user starts its own again.
    """
    server = forkserver._forkserver  # private, hence the fallback: without it children import main_nni
    previous = getattr(server, "_preload_modules", None)
    with contextlib.suppress(AttributeError):
        server._stop()
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["reliability_helpers"])
    # Python 3.11's forkserver ignores our sys.path: give it the repo and tests/ by PYTHONPATH
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "tests"), *([old] if old else [])])
    try:
        warm = context.Process(target=time.sleep, args=(0,))
        warm.start()  # returns once the server has imported main_nni
        warm.join()
    finally:
        if old is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = old
    yield context
    with contextlib.suppress(AttributeError):
        server._stop()
    if previous is not None:
        context.set_forkserver_preload(previous)


class Child:
    """One main_nni run in a child process; its stdout and stderr go to <folder>.<n>.log."""

    count = 0

    def __init__(self, ctx, argv: list[str], out: Path, hook=None, tiny: bool = True) -> None:
        Child.count += 1
        self.log = out.parent / f"{out.name}.{Child.count}.log"
        self.started = time.monotonic()
        self.proc = ctx.Process(target=run_main, daemon=True,
                                args=([*argv, "--experiment_dir_name", str(out)], hook, str(self.log), tiny))
        self.proc.start()

    def wait(self, timeout: float = JOIN_TIMEOUT) -> int:
        self.proc.join(timeout)
        if self.proc.is_alive():
            self.proc.kill()
            pytest.fail(f"run did not end within {timeout} s (hung?); see {self.log}")
        return self.proc.exitcode

    def kill_after(self, delay: float) -> int:
        """SIGKILL the run `delay` s after its start unless it ended before; its exit code."""
        self.proc.join(max(0.0, self.started + delay - time.monotonic()))
        if self.proc.is_alive():
            self.proc.kill()  # SIGKILL
        return self.wait()

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""


def check_no_half_written_file(out: Path, num_epoch: int) -> None:
    """Every output in `out` is complete: checkpoints load, results parse, predictions have every
    row; what else is there is a hidden temp file of an interrupted atomic write."""
    if not out.exists():  # killed before it made the folder
        return
    names = {p.name for p in out.iterdir()}
    for name in names:
        if name.startswith(".") and name != ".lock":
            assert TEMP_NAME.fullmatch(name), f"unexpected hidden file {name} in the run folder"
    epochs = {}
    for name in ("best.pth", "last.pth"):
        if name in names:
            ckpt = safe_torch_load(out / name)
            assert ckpt["format"] == main_nni.CHECKPOINT_FORMAT and ckpt["model"], name
            epochs[name] = ckpt["epoch"]
    if "best.pth" in epochs and "last.pth" in epochs:
        assert epochs["best.pth"] <= epochs["last.pth"] + 1  # best is written just before last
    if "results.json" in names:
        results = json.loads((out / "results.json").read_text())
        assert results["n_images"] == N_TEST and "srcc" in results
        assert epochs.get("last.pth") == num_epoch  # results only after the last epoch
    if "test_predictions.csv" in names:
        rows = list(csv.reader((out / "test_predictions.csv").open()))
        assert rows[0] == PREDICTION_HEADER and len(rows) == N_TEST + 1
        assert all(len(row) == 4 and math.isfinite(float(row[3])) for row in rows[1:])


def same_tensors(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_tensors(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(same_tensors, a, b))
    return a == b or (isinstance(a, float) and math.isnan(a) and isinstance(b, float) and math.isnan(b))


def comparable_results(out: Path) -> str:
    """results.json without what legitimately differs between runs (paths, durations)."""
    results = json.loads((out / "results.json").read_text())
    for key in ("checkpoint", "test_seconds", "test_images_per_s"):
        results.pop(key)
    for row in results["history"]:
        row.pop("seconds")
        row.pop("train_images_per_s")
    return json.dumps(results, sort_keys=True)


def assert_same_run(out: Path, ref: Path) -> None:
    for name in ("last.pth", "best.pth"):
        got, want = safe_torch_load(out / name), safe_torch_load(ref / name)
        for key in ("model", "optimizer", "epoch", "best_epoch", "best_metric"):
            assert same_tensors(got[key], want[key]), f"{name}: {key} differs from the uninterrupted run"
    assert comparable_results(out) == comparable_results(ref)
    assert (out / "test_predictions.csv").read_bytes() == (ref / "test_predictions.csv").read_bytes()
    assert Path(json.loads((out / "results.json").read_text())["checkpoint"]) == out / "best.pth"


# Every hook of this plan fires, in this order (the run's writes are deterministic): 10 kills,
# 4 of them in the middle of writing a file. (kind, file name suffix, nth such write of the process)
HOOK_PLAN = [
    ("partial", ".pth", 1),  # epoch 1's first checkpoint, half written
    ("before_replace", "last.pth", 1),  # epoch 1: temp file complete, not renamed
    ("after_replace", "last.pth", 1),  # epoch 1 saved, nothing after it done
    ("partial", "last.pth", 1),  # epoch 2, mid-write
    ("after_replace", "last.pth", 2),  # epochs 2 and 3 saved, no results yet
    ("partial", "test_predictions.csv", 1),
    ("before_replace", "test_predictions.csv", 1),
    ("partial", "results.json", 1),
    ("before_replace", "results.json", 1),
    ("after_replace", "results.json", 1),  # every output complete, the lock still there
]


@pytest.fixture(scope="module")
def tiny_reference(ctx, demo_root, tmp_path_factory):
    """(argv, folder, seconds) of an uninterrupted tiny run."""
    argv = [*TINY, "--path_to_save_csv", str(demo_root)]
    ref = tmp_path_factory.mktemp("reference") / "run"
    child = Child(ctx, argv, ref)
    assert child.wait() == 0, child.tail()
    check_no_half_written_file(ref, 3)
    return argv, ref, time.monotonic() - child.started


def resume_killed(ctx, argv: list[str], out: Path, *, hook=None, delay: float | None = None) -> int:
    """One --resume run of `out`, killed by `hook` or after `delay` s; checks the folder after it."""
    stale_lock = (out / ".lock").exists()
    temps = {p.name for p in out.glob(".*.tmp")} if out.exists() else set()
    child = Child(ctx, [*argv, "--resume"], out, hook=hook)
    code = child.kill_after(delay) if delay is not None else child.wait()
    assert code in (0, -signal.SIGKILL), f"exit code {code}; {child.tail()}"
    check_no_half_written_file(out, 3)
    if stale_lock and (code == 0 or hook):  # it got past the lock: the killed run's lock was taken over
        assert "taking over stale lock" in child.tail()
    if hook and hook[0] == "partial":
        assert {p.name for p in out.glob(".*.tmp")} - temps, f"{hook}: no partial file was left"
    return code


def finish_and_compare(ctx, argv: list[str], out: Path, ref: Path) -> None:
    child = Child(ctx, [*argv, "--resume"], out)
    assert child.wait() == 0, child.tail()
    check_no_half_written_file(out, 3)
    assert_same_run(out, ref)
    assert not list(out.glob(".*.tmp")), "the partial files of the killed runs were not removed"
    assert not (out / ".lock").exists()


def test_killed_while_writing_each_output_then_resumed_ends_like_an_uninterrupted_run(ctx, tiny_reference, tmp_path):
    argv, ref, _ = tiny_reference
    out = tmp_path / "run"
    for hook in HOOK_PLAN:
        assert resume_killed(ctx, argv, out, hook=hook) == -signal.SIGKILL, f"{hook} was not reached"
    finish_and_compare(ctx, argv, out, ref)
    assert "removed .results.json." in (out / "train.log").read_text()  # the partial results, cleaned up


def test_killed_at_random_moments_then_resumed_ends_like_an_uninterrupted_run(ctx, tiny_reference, tmp_path):
    """Runs SIGKILLed after random delays spanning an uninterrupted run, several times in a row,
    until 6 kills landed; every run, once resumed to its end, equals the uninterrupted one."""
    argv, ref, seconds = tiny_reference
    rng = random.Random(20240601)
    kills, runs = [], 0
    while len(kills) < 6:
        runs += 1
        assert runs <= 10, f"only {len(kills)} kills landed in 10 runs of {seconds:.2f} s: {kills}"
        out = tmp_path / f"run{runs}"
        for _ in range(4):  # kill the same run up to 4 times in a row, then let it finish
            delay = rng.uniform(0.0, seconds)
            if resume_killed(ctx, argv, out, delay=delay) == 0:
                break
            kills.append(round(delay / seconds, 2))
        finish_and_compare(ctx, argv, out, ref)


def test_real_tanet_killed_mid_checkpoint_resumes_to_the_same_weights(ctx, demo_root, tmp_path):
    argv = ["--dataset", "demo", "--demo_images", "48", "16", "--path_to_save_csv", str(demo_root),
            "--max_images", "2", "--batch_size", "2", "--num_epoch", "2", "--num_workers", "0", "--device", "cpu",
            "--quiet", "--no_report", "--seed", "1"]
    ref = tmp_path / "uninterrupted"
    out = tmp_path / "killed"
    child = Child(ctx, argv, ref, tiny=False)
    assert child.wait() == 0, child.tail()
    # SIGKILL 1 MiB into the 76 MB last.pth of epoch 1 (best.pth was written just before it)
    child = Child(ctx, [*argv, "--resume"], out, hook=("partial", "last.pth", 1), tiny=False)
    assert child.wait() == -signal.SIGKILL, child.tail()
    partial = list(out.glob(".last.pth.*.tmp"))
    assert len(partial) == 1 and partial[0].stat().st_size == 1 << 20
    assert not (out / "last.pth").exists() and safe_torch_load(out / "best.pth")["epoch"] == 1
    with pytest.raises(safe_io.CheckpointError):
        safe_torch_load(partial[0])  # what a non-atomic save would have left as last.pth
    child = Child(ctx, [*argv, "--resume"], out, tiny=False)
    assert child.wait() == 0, child.tail()
    assert_same_run(out, ref)
    assert not list(out.glob(".*.tmp"))


# --------------------------------------------------------------------------- two runs, one folder

def test_second_run_on_a_live_runs_folder_is_refused_and_a_dead_runs_lock_is_taken_over(
        ctx, demo_root, tmp_path, monkeypatch, capsys):
    argv = [*TINY, "--path_to_save_csv", str(demo_root), "--num_epoch", "100000"]
    out = tmp_path / "run"
    live = Child(ctx, argv, out)
    deadline = time.monotonic() + JOIN_TIMEOUT
    while not (out / "last.pth").exists():
        assert live.proc.is_alive() and time.monotonic() < deadline, live.tail()
        time.sleep(0.05)
    monkeypatch.setattr(main_nni, "TANet", TinyTANet)
    log_before = (out / "train.log").read_text()

    for extra in ([], ["--resume"]):
        assert main_nni.main([*argv, "--experiment_dir_name", str(out), *extra]) == 1
        err = capsys.readouterr().err
        assert f"pid {live.proc.pid}" in err and str(out / ".lock") in err and "in use by another run" in err
        assert len(err.strip().splitlines()) == 1, err
    assert live.proc.is_alive(), "the refused run disturbed the live one"
    assert (out / ".lock").read_text().split("\n")[0] == str(live.proc.pid)
    assert (out / "train.log").read_text().startswith(log_before)
    assert "in use by another run" not in (out / "train.log").read_text()  # nothing written into its log

    assert live.kill_after(0) == -signal.SIGKILL
    with pytest.warns(RuntimeWarning, match=f"taking over stale lock .* of dead process {live.proc.pid}"):
        code = main_nni.main([*argv, "--num_epoch", "1", "--experiment_dir_name", str(out), "--resume"])
    assert code == 0, capsys.readouterr().err
    assert not (out / ".lock").exists()
    check_no_half_written_file(out, safe_torch_load(out / "last.pth")["epoch"])


def test_stale_temp_files_are_recognised_by_name_only(tmp_path):
    keep = [".lock", ".notes.tmp", "x.1234567890ab.tmp", ".a.pth.1234567890AB.tmp", ".a.pth.123.tmp"]
    stale = [".last.pth.0123456789ab.tmp", ".results.json.ba9876543210.tmp"]
    for name in keep + stale:
        (tmp_path / name).write_text("x")
    assert sorted(p.name for p in safe_io.remove_stale_temp_files(tmp_path)) == sorted(stale)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keep)
