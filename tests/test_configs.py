"""Each NNI config runs what its comment says it runs: its trial command, parsed as main_nni.py parses
it, and its search space."""
from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import torch
import yaml

import option
from models import get_pretrained_cfg
from helpers.runtime import resolve_amp

RELEASED = {v: get_pretrained_cfg(v).weight_file for v in ("tad66k", "ava")}  # the released weight files

REPO = Path(__file__).resolve().parents[1]
REFERENCE_TAD66K_SPACE = {  # the authors' search_space.json
    "batch_size": [40], "init_lr_res365_last": [1e-6], "init_lr_mobileNet": [1e-6, 1e-7], "init_lr_head": [1e-6, 1e-7],
    "init_lr_head_rgb": [1e-7, 1e-7], "init_lr_hypernet": [1e-6, 3e-7], "init_lr_tygertnet": [1e-6, 3e-7],
    "init_lr": [1e-6, 3e-7],
}


def load(name: str) -> tuple[dict, option.argparse.Namespace, dict]:
    """(config, its trial command's options with the dataset defaults, its search space)."""
    path = REPO / name
    config = yaml.safe_load(path.read_text())
    words = shlex.split(config["trialCommand"])
    assert words[:2] == ["python3", "main_nni.py"], words
    args = option.apply_dataset_defaults(option.init(words[2:]))
    space = json.loads((path.parent / config["searchSpaceFile"]).read_text())
    assert (path.parent / config["trialCodeDirectory"]).resolve() == REPO
    for name_ in space:  # every searched option exists
        assert hasattr(args, name_), name_
    return config, args, space


@pytest.mark.parametrize("name", ["config.yml", "experiments/config_multi_gpu.yml", "experiments/config_remote.yml"])
def test_the_reference_tad66k_experiment_fine_tunes_the_released_checkpoint(name):
    config, args, space = load(name)
    assert args.dataset == "tad66k" and args.path_to_model_weight == RELEASED["tad66k"] and args.download
    assert not args.test_only
    assert {k: v["_value"] for k, v in space.items()} == REFERENCE_TAD66K_SPACE
    assert config["tuner"]["classArgs"]["optimize_mode"] == "maximize"


def test_training_from_the_backbones_has_its_own_config():
    config, args, space = load("experiments/config_tad66k_from_backbones.yml")
    assert args.dataset == "tad66k" and args.path_to_model_weight is None and args.backbones == "pretrained"
    assert args.num_epoch == 200 and args.init_lr_head == option.REFERENCE_LR
    for key in ("init_lr_mobileNet", "init_lr_head"):
        assert option.REFERENCE_LR in space[key]["_value"] and min(space[key]["_value"]) >= 1e-5


def test_the_reference_ava_experiment_evaluates_the_released_checkpoint():
    config, args, space = load("experiments/config_ava.yml")
    assert args.dataset == "ava" and args.test_only and args.path_to_model_weight == RELEASED["ava"]
    assert config["maxTrialNumber"] == 1 and args.batch_size == 48


def test_ava_training_has_its_own_config():
    _, args, space = load("experiments/config_ava_train.yml")
    assert args.dataset == "ava" and not args.test_only and args.path_to_model_weight is None
    assert min(space["init_lr_head"]["_value"]) >= 1e-5


def test_the_cpu_demo_sweep_is_a_sweep():
    config, args, space = load("experiments/config_demo_cpu.yml")
    assert args.dataset == "demo" and config["trialGpuNumber"] == 0 and config["maxTrialNumber"] >= 4
    assert len(space) >= 2 and all(len(v["_value"]) >= 2 for v in space.values())


@pytest.mark.parametrize("name", ["config.yml", "experiments/config_multi_gpu.yml", "experiments/config_remote.yml",
                                  "experiments/config_tad66k_from_backbones.yml", "experiments/config_ava.yml",
                                  "experiments/config_ava_train.yml"])
def test_the_reference_experiments_run_in_float32(name, monkeypatch):
    """Trained and evaluated at the reference's precision on every machine, bfloat16 CPUs included."""
    monkeypatch.setenv("TANET_CPU_BF16", "1")
    _, args, space = load(name)
    assert args.amp == "none" and "amp" not in space
    assert resolve_amp(args.amp, torch.device("cpu")) == "none"
