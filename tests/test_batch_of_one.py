"""A training batch of one image (issue 23, item 2): it trains; batches of two or more are unchanged."""
from __future__ import annotations

import copy
import json

import pytest
import torch

import main_nni
from models import TANet

BASE = ["--dataset", "demo", "--demo_images", "48", "16", "--num_workers", "0", "--device", "cpu", "--quiet",
        "--no_report", "--amp", "none"]


def test_a_batch_of_one_trains_with_the_theme_heads_running_statistics(one_thread):
    torch.manual_seed(0)
    model = TANet("tad66k").train()
    bn = model.tygertnet.bn1
    bn.running_mean.fill_(0.5)
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    model(torch.randn(1, 3, 224, 224)).sum().backward()
    after = bn.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "a batch of one updated the statistics"
    model(torch.randn(2, 3, 224, 224))  # two images: batch statistics, updated as before
    assert not torch.equal(bn.running_mean, before["running_mean"])
    assert int(bn.num_batches_tracked) == int(before["num_batches_tracked"]) + 1


def test_batches_of_two_or_more_are_the_references_to_the_bit(one_thread):
    """The theme head of two or more images: the reference's Dropout(PReLU(BatchNorm1d(fc1(s)))), in train mode
    (batch statistics, updated) with the same dropout draws."""
    torch.manual_seed(0)
    net = TANet("tad66k").train().tygertnet
    reference = copy.deepcopy(net)
    for batch in (2, 5):
        s = torch.randn(batch, 365)
        torch.manual_seed(batch)
        got = net.hidden(s)
        torch.manual_seed(batch)
        want = reference.drop1(reference.relu1(reference.bn1(reference.fc1(s))))
        assert torch.equal(got, want)
        assert torch.equal(net.bn1.running_var, reference.bn1.running_var)


@pytest.mark.slow
@pytest.mark.parametrize("batch", [1, 2])
def test_the_trial_trains_with_a_last_batch_of_one(demo_root, tmp_path, one_thread, batch):
    """3 training images in batches of 2 (a last batch of one), or of 1: the epoch trains and is tested."""
    out = tmp_path / "run"
    assert main_nni.main([*BASE, "--path_to_save_csv", str(demo_root), "--max_images", "3", "--batch_size",
                          str(batch), "--eval_batch_size", "4", "--num_epoch", "1",
                          "--experiment_dir_name", str(out)]) == 0
    assert "data: train 3," in (out / "train.log").read_text()
    results = json.loads((out / "results.json").read_text())
    assert len(results["history"]) == 1 and results["n_images"] == 3
