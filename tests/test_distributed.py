"""torchrun with two CPU processes (gloo): training, resume, and evaluation that equals one process."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import main_nni

pytestmark = pytest.mark.slow  # 2-process torchrun jobs

REPO = Path(__file__).resolve().parent.parent
# Evaluation batches of 6: 16 test images make 3 batches, so the two ranks get unequal numbers of them.
COMMON = ["--dataset", "demo", "--demo_images", "48", "16", "--max_images", "16", "--batch_size", "4",
          "--eval_batch_size", "6",
          "--num_workers", "0", "--device", "cpu", "--quiet", "--no_report"]


def torchrun(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "main_nni.py"), *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def read_predictions(path: Path) -> list[tuple[str, float]]:
    with open(path, newline="") as f:
        return [(row["image"], float(row["pred_score"])) for row in csv.DictReader(f)]


@pytest.fixture(scope="module")
def ddp_run(demo_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    done = torchrun(*COMMON, "--path_to_save_csv", str(demo_root), "--experiment_dir_name", str(out),
                    "--num_epoch", "1")
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_two_process_training_writes_one_set_of_outputs(ddp_run):
    results = json.loads((ddp_run / "results.json").read_text())
    assert results["n_images"] == 16  # every test image exactly once, none padded in
    assert len(read_predictions(ddp_run / "test_predictions.csv")) == 16
    assert "2 process(es)" in (ddp_run / "train.log").read_text()


def test_two_process_evaluation_equals_one_process(ddp_run, demo_root, tmp_path):
    ckpt = str(ddp_run / "best.pth")
    one, two = tmp_path / "one", tmp_path / "two"
    args = [*COMMON, "--path_to_save_csv", str(demo_root), "--test_only", "--path_to_model_weight", ckpt]
    assert main_nni.main([*args, "--experiment_dir_name", str(one)]) == 0
    done = torchrun(*args, "--experiment_dir_name", str(two))
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = read_predictions(one / "test_predictions.csv"), read_predictions(two / "test_predictions.csv")
    trained = read_predictions(ddp_run / "test_predictions.csv")  # made by the two training processes
    assert [n for n, _ in a] == [n for n, _ in b] == [n for n, _ in trained]
    assert all(abs(x - y) < 1e-5 for (_, x), (_, y) in zip(a, b))
    assert all(abs(x - y) < 1e-5 for (_, x), (_, y) in zip(a, trained))
    ra, rb = (json.loads((d / "results.json").read_text()) for d in (one, two))
    assert abs(ra["srcc"] - rb["srcc"]) < 1e-6 and ra["n_images"] == rb["n_images"] == 16


def test_resume_under_ddp(ddp_run, demo_root, tmp_path):
    import shutil

    out = tmp_path / "resumed"
    shutil.copytree(ddp_run, out, ignore=shutil.ignore_patterns("logs", ".lock"))
    done = torchrun(*COMMON, "--path_to_save_csv", str(demo_root), "--experiment_dir_name", str(out),
                    "--num_epoch", "2", "--resume")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in (out / "train.log").read_text()
    results = json.loads((out / "results.json").read_text())
    assert len(results["history"]) == 2
    # Every rank tests the best weights: those rank 0 has just written (not an older best.pth).
    assert results["best_epoch"] == 2, "this check needs epoch 2 to be the best one"
    one = tmp_path / "one"
    assert main_nni.main([*COMMON, "--path_to_save_csv", str(demo_root), "--test_only", "--path_to_model_weight",
                          str(out / "best.pth"), "--experiment_dir_name", str(one)]) == 0
    a, b = read_predictions(one / "test_predictions.csv"), read_predictions(out / "test_predictions.csv")
    assert [n for n, _ in a] == [n for n, _ in b]
    assert all(abs(x - y) < 1e-5 for (_, x), (_, y) in zip(a, b))


@pytest.mark.parametrize("device, backend, world, local_rank, gpus, expected", [
    ("auto", "auto", 1, 0, 0, ("auto", None)),            # one process: no process group
    ("auto", "auto", 1, 0, 2, ("cuda:0", None)),          # --gpu_id 0
    ("cpu", "auto", 2, 1, 2, ("cpu", "gloo")),
    ("auto", "auto", 2, 0, 0, ("auto", "gloo")),          # no GPU: gloo on the CPU
    ("auto", "auto", 4, 3, 4, ("cuda:3", "nccl")),        # one GPU per local rank
    ("cuda:2", "auto", 2, 1, 4, ("cuda:1", "nccl")),      # under torchrun the local rank picks the GPU
    ("auto", "gloo", 2, 1, 1, ("cuda:0", "gloo")),        # gloo: processes may share a GPU
])
def test_place_process(device, backend, world, local_rank, gpus, expected):
    assert main_nni.place_process(device, "0", backend, world, local_rank, gpus) == expected


def test_place_process_refuses_what_nccl_cannot_do():
    with pytest.raises(ValueError, match="NCCL needs one GPU per process.*--dist_backend gloo"):
        main_nni.place_process("auto", "0", "auto", 2, 1, 1)
    with pytest.raises(ValueError, match="--dist_backend nccl needs CUDA"):
        main_nni.place_process("cpu", "0", "nccl", 2, 0, 0)
