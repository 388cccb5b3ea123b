"""The trial script end to end on a few demo images: train, test-only, resume, options, NNI parameters."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from training import engine
import main_nni
import option
from reliability_helpers import TinyTANet
from report import read_predictions
from helpers.runtime import amp_dtype, resolve_amp
from helpers.safe_io import safe_torch_load

# 16 images of each split, 2 epochs of 2 batches: a few seconds on a CPU.
BASE = ["--dataset", "demo", "--demo_images", "48", "16", "--max_images", "16", "--batch_size", "8",
        "--num_workers", "0", "--device", "cpu", "--quiet", "--no_report"]


def run_main(demo_root, out, *extra) -> int:
    return main_nni.main([*BASE, "--path_to_save_csv", str(demo_root), "--experiment_dir_name", str(out), *extra])


@pytest.fixture
def tiny(monkeypatch):
    """TinyTANet for the tests of the loop's mechanics (resume, schedules, checks): seconds, not minutes."""
    monkeypatch.setattr(main_nni, "TANet", TinyTANet)


@pytest.fixture(scope="module")
def trained(demo_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert run_main(demo_root, out, "--num_epoch", "2") == 0
    return out


@pytest.mark.slow
def test_training_writes_results_checkpoints_and_logs(trained):
    results = json.loads((trained / "results.json").read_text())
    for key in ("srcc", "plcc", "accuracy", "mse", "n_images", "split", "checkpoint", "per_theme", "best_epoch"):
        assert key in results
    assert results["n_images"] == 16 and results["split"] == "test"
    assert len(results["history"]) == 2
    assert all(epoch["train_images_per_s"] > 0 for epoch in results["history"])
    assert results["test_images_per_s"] > 0 and results["test_seconds"] > 0
    assert {"srcc", "plcc", "n"} <= set(next(iter(results["per_theme"].values())))
    for name in ("best.pth", "last.pth", "train.log", "test_predictions.csv"):
        assert (trained / name).is_file(), name
    assert list((trained / "logs").iterdir()), "no tensorboard events"
    last = safe_torch_load(trained / "last.pth")
    assert last["epoch"] == 2 and last["variant"] == "tad66k"
    assert {"model", "optimizer", "rng", "options", "best_metric"} <= set(last)
    assert not (trained / ".lock").exists()
    assert "memory allocator tuned" in (trained / "train.log").read_text()  # --allocator tuned, the default


@pytest.mark.slow
def test_test_only_reproduces_the_training_runs_test_metrics(trained, demo_root, tmp_path):
    assert run_main(demo_root, tmp_path, "--test_only", "--path_to_model_weight", str(trained / "best.pth")) == 0
    again = json.loads((tmp_path / "results.json").read_text())
    first = json.loads((trained / "results.json").read_text())
    for key in ("srcc", "plcc", "accuracy", "mse", "n_images"):
        assert again[key] == first[key], key


def test_resume_continues_to_the_same_weights(tiny, demo_root, tmp_path):
    # A constant schedule, so a run of 1 epoch extended to 2 is the run of 2 (the cosine one's rates depend on
    # --num_epoch: its resume is the test below).
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert run_main(demo_root, whole, "--num_epoch", "2", "--lr_schedule", "constant") == 0
    assert run_main(demo_root, split, "--num_epoch", "1", "--lr_schedule", "constant") == 0
    assert run_main(demo_root, split, "--num_epoch", "2", "--lr_schedule", "constant", "--resume") == 0
    a = safe_torch_load(whole / "last.pth")["model"]
    b = safe_torch_load(split / "last.pth")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    results = [json.loads((d / "results.json").read_text()) for d in (whole, split)]
    assert results[0]["mse"] == results[1]["mse"]


@pytest.mark.slow
def test_existing_run_is_not_overwritten_without_resume(trained, demo_root):
    before = (trained / "last.pth").read_bytes()
    assert run_main(demo_root, trained, "--num_epoch", "1") == 1
    assert (trained / "last.pth").read_bytes() == before


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny, demo_root, tmp_path, monkeypatch, caplog):
    assert run_main(demo_root, tmp_path, "--num_epoch", "1") == 0
    good = (tmp_path / "last.pth").read_bytes()
    monkeypatch.setattr(main_nni, "make_criterion", lambda name: lambda p, t: (p - t).sum() * float("nan"))
    assert run_main(demo_root, tmp_path, "--num_epoch", "2", "--resume") == 1
    assert (tmp_path / "last.pth").read_bytes() == good
    assert "non-finite loss" in (tmp_path / "train.log").read_text()


def test_missing_weights_and_bad_options_fail_clearly(demo_root, tmp_path, capsys):
    assert run_main(demo_root, tmp_path, "--test_only") == 2
    assert "--test_only needs --path_to_model_weight" in capsys.readouterr().err
    assert run_main(demo_root, tmp_path, "--batch_size", "0") == 2
    assert run_main(demo_root, tmp_path, "--test_only", "--path_to_model_weight", str(tmp_path / "nope.pth")) == 1


def test_reference_option_names_and_float_learning_rates():
    args = option.init(["--init_lr_head", "1e-7", "--path_to_images", "x", "--gpu_id", "1", "--num_epoch", "3"])
    assert args.init_lr_head == 1e-7 and isinstance(args.init_lr_head, float)
    for name in ("path_to_images", "path_to_save_csv", "experiment_dir_name", "path_to_model_weight",
                 "init_lr_res365_last", "init_lr_mobileNet", "init_lr_head", "init_lr_head_rgb",
                 "init_lr_hypernet", "init_lr_tygertnet", "init_lr", "num_epoch", "batch_size",
                 "num_workers", "gpu_id"):
        assert hasattr(args, name), name


@pytest.mark.parametrize("dataset,batch,epochs,variant", [("tad66k", 40, 200, "tad66k"), ("ava", 48, 20, "ava")])
def test_dataset_defaults_follow_the_reference(dataset, batch, epochs, variant):
    args = option.apply_dataset_defaults(option.init(["--dataset", dataset]))
    assert (args.batch_size, args.num_epoch, args.variant, args.eval_batch_size) == (batch, epochs, variant, batch)


def test_nni_parameters_override_and_are_checked():
    args = option.init([])
    option.merge_nni_parameters(args, {"batch_size": 48.0, "init_lr_head": 1e-6, "theme_fusion": "isolated"})
    assert args.batch_size == 48 and isinstance(args.batch_size, int)
    assert args.init_lr_head == 1e-6 and args.theme_fusion == "isolated"
    with pytest.raises(ValueError, match="'learning_rate' is not an option"):
        option.merge_nni_parameters(args, {"learning_rate": 1e-3})
    with pytest.raises(ValueError, match="'batch_size' must be an integer"):
        option.merge_nni_parameters(args, {"batch_size": 40.5})
    with pytest.raises(ValueError, match="'init_lr' must be a number"):
        option.merge_nni_parameters(args, {"init_lr": "fast"})
    with pytest.raises(ValueError, match="not one of"):
        option.merge_nni_parameters(args, {"theme_fusion": "mean"})


def test_ill_typed_nni_parameter_stops_the_trial(demo_root, tmp_path, monkeypatch, capsys):
    class FakeNNI:
        @staticmethod
        def get_experiment_id():
            return "exp"

        @staticmethod
        def get_next_parameter():
            return {"batch_size": "big"}

    monkeypatch.setattr(main_nni, "nni", FakeNNI)
    assert run_main(demo_root, tmp_path) == 2
    assert "'batch_size' must be an integer" in capsys.readouterr().err


class Stop(BaseException):
    pass


def test_cosine_schedule_lowers_the_rates_and_resumes_exactly(tiny, demo_root, tmp_path, monkeypatch):
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert run_main(demo_root, whole, "--num_epoch", "2", "--lr_schedule", "cosine") == 0

    save = main_nni.save_run_checkpoint

    def save_then_stop(path, *args, **kwargs):  # the run is killed once epoch 1's last.pth is written
        save(path, *args, **kwargs)
        if path.name == "last.pth":
            raise Stop

    monkeypatch.setattr(main_nni, "save_run_checkpoint", save_then_stop)
    with pytest.raises(Stop):
        run_main(demo_root, split, "--num_epoch", "2", "--lr_schedule", "cosine")
    monkeypatch.setattr(main_nni, "save_run_checkpoint", save)
    assert safe_torch_load(split / "last.pth")["epoch"] == 1
    assert run_main(demo_root, split, "--num_epoch", "2", "--lr_schedule", "cosine", "--resume") == 0
    a, b = (safe_torch_load(d / "last.pth") for d in (whole, split))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    groups = a["optimizer"]["param_groups"]
    # 2 epochs of 2 steps: the last step ran at factor (1 + cos(3 pi / 4)) / 2 of the initial rate
    assert all(g["lr"] == pytest.approx(g["initial_lr"] * (1 - 2 ** -0.5) / 2) for g in groups)
    assert {g["initial_lr"] for g in groups if g["name"] == "mobileNet"} == {
        option.DATASET_DEFAULTS["demo"]["init_lr_mobileNet"]}


@pytest.mark.slow
def test_fused_evaluation_gives_the_unfused_scores(trained, demo_root, tmp_path, monkeypatch):
    """The demo evaluates with --fuse_conv (on by default), in bfloat16 on CPUs that have it; --no-fuse_conv
    gives the same scores up to that rounding."""
    dtype = amp_dtype(resolve_amp("auto", torch.device("cpu")))
    calls = []
    fuse = engine.fuse_conv_activations
    monkeypatch.setattr(engine, "fuse_conv_activations", lambda *a, **k: calls.append(a[1]) or fuse(*a, **k))
    weights = str(trained / "best.pth")
    assert run_main(demo_root, tmp_path / "fused", "--test_only", "--path_to_model_weight", weights) == 0
    assert calls == [dtype]
    assert run_main(demo_root, tmp_path / "plain", "--test_only", "--path_to_model_weight", weights,
                    "--no-fuse_conv") == 0
    assert calls == [dtype]
    fused, plain = (read_predictions(tmp_path / name / "test_predictions.csv") for name in ("fused", "plain"))
    assert fused.names == plain.names
    assert np.abs(fused.pred - plain.pred).max() < 0.05  # on the 1..10 scale


def test_fuse_conv_needs_fold_bn(demo_root, tmp_path, capsys):
    assert run_main(demo_root, tmp_path, "--no-fold_bn", "--fuse_conv") == 2
    assert "--fuse_conv needs --fold_bn" in capsys.readouterr().err


@pytest.mark.slow
def test_system_allocator_option(trained, demo_root, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(main_nni, "tune_cpu_allocator", lambda: calls.append(1) or True)
    weights = str(trained / "best.pth")
    assert run_main(demo_root, tmp_path / "a", "--test_only", "--path_to_model_weight", weights,
                    "--allocator", "system") == 0
    assert calls == [] and "allocator tuned" not in (tmp_path / "a" / "train.log").read_text()
    assert run_main(demo_root, tmp_path / "b", "--test_only", "--path_to_model_weight", weights) == 0
    assert calls == [1]


def test_amp_auto_is_resolved_and_logged(tiny, demo_root, tmp_path, monkeypatch):
    """--amp auto (the demo's) runs bf16 only where the CPU has bfloat16 instructions; an explicit bf16
    on a CPU without them runs, with a warning in the log. (2 test images: bf16 may be emulated here.)"""
    for native in (False, True):
        monkeypatch.setattr(main_nni, "cpu_has_native_bf16", lambda: native)
        monkeypatch.setattr("helpers.runtime.cpu_has_native_bf16", lambda: native)
        out = tmp_path / f"auto{native}"
        assert run_main(demo_root, out, "--num_epoch", "0", "--max_images", "2") == 0
        saved = json.loads((out / "results.json").read_text())
        assert "precision: " + ("bf16" if native else "float32") in (out / "train.log").read_text()
        assert saved["n_images"] == 2 and saved["evaluation"]["amp"] == ("bf16" if native else "none")
        assert saved["precision"] == ("bf16" if native else "float32") and saved["evaluation"]["device"] == "cpu"
        assert saved["hardware"]["cpu"] and saved["hardware"]["torch"] == torch.__version__
    monkeypatch.setattr(main_nni, "cpu_has_native_bf16", lambda: False)
    out = tmp_path / "forced"
    assert run_main(demo_root, out, "--num_epoch", "0", "--amp", "bf16", "--no-fuse_conv", "--max_images", "2") == 0
    assert "emulated on this CPU" in (out / "train.log").read_text()



def full_disk_for(monkeypatch, name: str, tries: int) -> dict:
    """The first ``tries`` checkpoint writes of ``name`` find the disk full (as safe_io reports it);
    ``["writes"]`` counts every write of that name, ``["tries"]`` may be changed."""
    from helpers.safe_io import disk_full_error

    real, disk = main_nni.atomic_torch_save, {"tries": tries, "writes": 0}

    def save(obj, path):
        if path.name == name:
            disk["writes"] += 1
            if disk["writes"] <= disk["tries"]:
                raise disk_full_error(path, 12_345_678)
        real(obj, path)

    monkeypatch.setattr(main_nni, "atomic_torch_save", save)
    monkeypatch.setattr(main_nni, "SAVE_RETRY_WAITS", (0.0, 0.0))
    return disk


def test_a_full_disk_while_saving_is_tried_again(tiny, demo_root, tmp_path, monkeypatch):
    disk = full_disk_for(monkeypatch, "last.pth", tries=2)
    assert run_main(demo_root, tmp_path, "--num_epoch", "1") == 0
    assert disk["writes"] == 3 and safe_torch_load(tmp_path / "last.pth")["epoch"] == 1
    log = (tmp_path / "train.log").read_text()
    assert log.count(f"no space left on the device of {tmp_path}: last.pth needs 12.3 MB") == 2
    assert "trying again in 0 s" in log


def test_a_disk_that_stays_full_stops_the_run_resumable(tiny, demo_root, tmp_path, monkeypatch, capsys):
    assert run_main(demo_root, tmp_path, "--num_epoch", "1") == 0
    disk = full_disk_for(monkeypatch, "last.pth", tries=99)
    assert run_main(demo_root, tmp_path, "--num_epoch", "2", "--resume") == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and disk["writes"] == 3
    last = err.strip().splitlines()[-1]
    assert f"no space left on the device of {tmp_path}: last.pth needs 12.3 MB" in last
    assert "epoch 2 of 2" in last and "--resume" in last and str(tmp_path) in last
    assert last.split(" ", 1)[1] in (tmp_path / "train.log").read_text()
    assert safe_torch_load(tmp_path / "last.pth")["epoch"] == 1 and not (tmp_path / ".lock").exists()
    disk["tries"] = 0  # space freed: the command of the message finishes the run
    assert run_main(demo_root, tmp_path, "--num_epoch", "2", "--resume") == 0
    assert safe_torch_load(tmp_path / "last.pth")["epoch"] == 2
