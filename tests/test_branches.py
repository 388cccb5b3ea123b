"""The ablation variants of Table 5 (TANet(branches=...)): what each builds and runs, the checkpoint
records and checks of its branches, isolated scoring without the theme network, and every variant
through training, test, scoring and the report."""
from __future__ import annotations

import json

import pytest
import torch

import main_nni
from golden import golden_input, golden_state_dict
from models import BRANCHES, TANet, check_branches, load_tanet
from report import write_report
from helpers.safe_io import CheckpointError
from scoring import Scorer

VARIANTS = [("aesthetics",), ("aesthetics", "theme"), ("aesthetics", "rgb"), BRANCHES]


@pytest.mark.parametrize("branches", VARIANTS)
def test_a_branch_left_out_is_neither_built_nor_run(branches):
    model = TANet("tad66k", branches=branches).eval()
    keys = model.state_dict().keys()
    assert any(k.startswith("res365_last.") for k in keys) == ("theme" in branches)
    assert any(k.startswith("head_rgb.") for k in keys) == ("rgb" in branches)
    assert model.head[2].in_features == 10 * len(branches)
    with torch.no_grad():
        out = model.forward_branches(torch.randn(3, 3, 224, 224))
    assert out["output"].shape == (3, 1)
    assert (out["x_theme"] is None) == ("theme" not in branches) and (out["x_rgb"] is None) == ("rgb" not in branches)


def test_the_full_model_is_the_reference():
    assert TANet("ava").branches == BRANCHES == check_branches("rgb, theme,aesthetics")
    assert list(TANet("ava").state_dict()) == list(TANet("ava", branches=BRANCHES).state_dict())
    with pytest.raises(ValueError, match="including aesthetics"):
        check_branches("theme,rgb")
    with pytest.raises(ValueError, match="among"):
        TANet(branches=("aesthetics", "colour"))
    with pytest.raises(ValueError, match="distinct"):
        check_branches("aesthetics,aesthetics")


@pytest.mark.parametrize("variant", ["tad66k", "ava"])
@pytest.mark.slow
def test_isolated_scoring_without_the_theme_network_gives_the_same_scores(variant, tmp_path):
    full = TANet(variant, theme_fusion="isolated")
    full.load_state_dict(golden_state_dict(variant))
    path = tmp_path / "full.pth"
    torch.save(full.state_dict(), path)
    lite, meta = load_tanet(path, theme_fusion="isolated", theme_network=False)
    assert not hasattr(lite, "res365_last") and meta["branches"] == list(BRANCHES)
    assert sum(p.numel() for p in lite.parameters()) < sum(p.numel() for p in full.parameters()) - 11_000_000
    x = golden_input(3)
    with torch.no_grad():
        assert torch.equal(lite.eval()(x), full.eval()(x))


def test_a_checkpoint_records_its_branches_and_refuses_others(tmp_path):
    model = TANet("tad66k", branches=("aesthetics", "rgb"))
    plain, ours = tmp_path / "plain.pth", tmp_path / "ours.pth"
    torch.save(model.state_dict(), plain)
    torch.save({"model": model.state_dict(), "variant": "tad66k", "branches": ["aesthetics", "rgb"]}, ours)
    for path in (plain, ours):
        loaded, meta = load_tanet(path)
        assert loaded.branches == ("aesthetics", "rgb") and meta["branches"] == ["aesthetics", "rgb"]
    with pytest.raises(CheckpointError, match=r"branches aesthetics,rgb, but aesthetics,theme,rgb were asked for"):
        load_tanet(ours, branches=BRANCHES)


@pytest.mark.slow
@pytest.mark.parametrize("branches", VARIANTS[:3])
def test_every_variant_trains_tests_scores_and_reports(demo_root, tmp_path, branches):
    common = ["--dataset", "demo", "--demo_images", "48", "16", "--max_images", "16", "--batch_size", "8",
              "--num_workers", "0", "--device", "cpu", "--quiet", "--path_to_save_csv", str(demo_root)]
    run = tmp_path / "run"
    assert main_nni.main([*common, "--num_epoch", "1", "--branches", ",".join(branches), "--experiment_dir_name",
                          str(run)]) == 0
    results = json.loads((run / "results.json").read_text())
    assert results["branches"] == list(branches) and results["n_images"] == 16
    ckpt = run / "last.pth"
    assert torch.load(ckpt, weights_only=True)["branches"] == list(branches)
    assert (run / "report.html").is_file()  # the report of the run, its absent branches' figures left out
    made = write_report(run, device="cpu", tensorboard=False)
    assert ("rgb_attention" in made.figures) == ("rgb" in branches)
    assert ("hidden_nodes" in made.figures) == ("theme" in branches)
    assert made.rerun_max_difference <= 1e-5
    test = tmp_path / "test"
    assert main_nni.main([*common, "--test_only", "--path_to_model_weight", str(ckpt), "--experiment_dir_name",
                          str(test)]) == 0
    again = json.loads((test / "results.json").read_text())
    assert again["mse"] == pytest.approx(results["mse"], abs=1e-9)
    assert again["srcc"] == pytest.approx(results["srcc"], abs=1e-6, nan_ok=True)
    scorer = Scorer(ckpt, device="cpu")
    assert scorer.model.branches == tuple(branches) and 1.0 <= scorer.score(torch.zeros(3, 224, 224)) <= 10.0
    wrong = ",".join(b for b in BRANCHES if b not in branches or b == "aesthetics")
    assert main_nni.main([*common, "--test_only", "--path_to_model_weight", str(ckpt), "--branches", wrong,
                          "--experiment_dir_name", str(tmp_path / "wrong")]) == 1
