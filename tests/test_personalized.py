"""paper/personalize.py and tools/paper_tables.py personalized: the frozen features give the model's own output,
fine-tuning learns, the protocol end to end on a tiny generated data set, the run folder, and a killed
run that resumes to the table of an uninterrupted one."""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from imagedata import personal_data
from paper import personalize as pz
from imagedata.flickr_aes import RatedImageDataset, load_split
from models import TANet
from models.tanet import fusion_head
from helpers.safe_io import atomic_torch_save

REPO = Path(__file__).resolve().parents[1]
PROTOCOL = pz.Protocol(shots=(4, 8), repeats=3, min_test_images=5, recipe=pz.Recipe(epochs=5))


class TinyTANet(nn.Module):
    """What the protocol uses of TANet (``mobileNet.base_model`` -> ``mobileNet.head``, ``head``,
    ``forward_branches``) at a tiny fraction of its cost."""

    def __init__(self) -> None:
        super().__init__()
        self.mobileNet = nn.Module()
        self.mobileNet.base_model = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Conv2d(3, 4, 1))
        self.mobileNet.head = nn.Sequential(nn.ReLU(), nn.Dropout(0.75), nn.Linear(64, 10))
        self.theme = nn.Linear(48, 10)
        self.head_rgb = nn.Sequential(nn.Linear(48, 10), nn.Softmax(dim=1))
        self.head = fusion_head(1)

    def forward_branches(self, x):
        pooled = nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)
        x_aes = self.mobileNet.head(self.mobileNet.base_model(x).flatten(1))
        x_theme, x_rgb = torch.softmax(self.theme(pooled), dim=1), self.head_rgb(pooled)
        return {"x_aes": x_aes, "x_theme": x_theme, "x_rgb": x_rgb,
                "output": self.head(torch.cat([x_aes, x_theme, x_rgb], dim=1))}

    def forward(self, x):
        return self.forward_branches(x)["output"]


@pytest.fixture(scope="module")
def tiny_data(personal_root):
    return personal_root


@pytest.fixture(scope="module")
def tiny_run(tiny_data):
    """The split, the tiny model's frozen features of the test images, and its heads."""
    torch.manual_seed(0)
    model = TinyTANet()
    split = load_split(tiny_data, tiny_data / personal_data.TEST_WORKERS_FILE)
    images = RatedImageDataset(split.test, split.ratings_csv, tiny_data / "40K", train=False)
    features = pz.extract_features(model, images, device=torch.device("cpu"), batch_size=8, progress=False)
    return split, features, pz.Heads(model), model, images


def settings(**extra):
    return {"protocol": "test", **extra}


def run(split, features, heads, out, protocol=PROTOCOL):
    store = pz.ResultStore(out, settings()).open()
    records = pz.run_protocol(split, features, heads, protocol, store, progress=False)
    return pz.write_outputs(out, records, protocol, {"data": "tiny", "generic": "tiny", "eval_batch_size": 8})


# --------------------------------------------------------------------------- features and heads

def test_heads_on_frozen_features_give_the_model_output(tiny_run):
    split, features, heads, model, images = tiny_run
    assert features.names == images.names and len(features.names) == len(split.test)
    with torch.no_grad():
        model.eval()
        x = torch.stack([images[i]["image"] for i in range(8)])  # the first evaluation batch
        expected = model(x)[:, 0].double().numpy()
    assert np.allclose(pz.predict(heads, features, np.arange(8)), expected, atol=1e-6)


def test_heads_give_tanets_output_with_batch_fusion():
    torch.manual_seed(0)
    model = TANet().eval()
    x = torch.randn(3, 3, 224, 224)
    captured = []
    model.mobileNet.base_model.register_forward_hook(lambda _m, _i, out: captured.append(out.flatten(1)))
    with torch.no_grad():
        out = model.forward_branches(x)
    features = pz.Features(["a", "b", "c"], captured[0], out["x_theme"], out["x_rgb"])
    assert np.allclose(pz.predict(pz.Heads(model), features, np.arange(3)), out["output"][:, 0].numpy(), atol=1e-6)


def test_finetuning_learns_a_workers_taste_and_leaves_the_generic_heads_alone(one_thread):
    torch.manual_seed(0)
    generic = pz.Heads(TinyTANet())
    n = 60
    trunk = torch.randn(n, 64)
    features = pz.Features([str(i) for i in range(n)], trunk, torch.full((n, 10), 0.1), torch.full((n, 10), 0.1))
    taste = trunk[:, :8].sum(1).numpy()  # the worker likes what the first trunk features say
    targets = 0.2 + 0.6 * (taste - taste.min()) / (taste.max() - taste.min())
    before = {k: v.clone() for k, v in generic.state_dict().items()}
    train, test = np.arange(40), np.arange(40, 60)
    tuned = pz.finetune(generic, features, train, targets[train], pz.Recipe(epochs=100, lr=1e-2), seed=0)
    same = pz.finetune(generic, features, train, targets[train], pz.Recipe(epochs=100, lr=1e-2), seed=0)
    gain = pz._srcc(pz.predict(tuned, features, test), taste[test]) - pz._srcc(pz.predict(generic, features, test),
                                                                                taste[test])
    assert gain > 0.3
    assert all(torch.equal(v, before[k]) for k, v in generic.state_dict().items())
    assert all(torch.equal(v, same.state_dict()[k]) for k, v in tuned.state_dict().items())  # seeded
    fusion_only = pz.finetune(generic, features, train, targets[train], pz.Recipe(parts="fusion", epochs=5), seed=0)
    assert torch.equal(fusion_only.aesthetics[2].weight, generic.aesthetics[2].weight)
    assert not torch.equal(fusion_only.fusion[2].weight, generic.fusion[2].weight)


def test_zero_epochs_of_fine_tuning_is_the_generic_model(tiny_run, tmp_path):
    split, features, heads, *_ = tiny_run
    protocol = pz.Protocol(shots=(4,), repeats=2, min_test_images=5, recipe=pz.Recipe(epochs=0))
    table = run(split, features, heads, tmp_path, protocol)["table"]["4"]
    assert table["finetuned"] == table["generic"] and table["gain"]["mean"] == 0.0


# --------------------------------------------------------------------------- the protocol end to end

def test_protocol_end_to_end(tiny_run, tmp_path):
    split, features, heads, *_ = tiny_run
    result = run(split, features, heads, tmp_path)
    for k in ("4", "8"):
        entry = result["table"][k]
        assert entry["workers"] == 3 and entry["skipped_workers"] == []
        assert len(entry["finetuned"]["per_repeat"]) == 3
        assert entry["finetuned"]["mean"] == pytest.approx(np.mean(entry["finetuned"]["per_repeat"]))
        assert entry["finetuned"]["std"] == pytest.approx(np.std(entry["finetuned"]["per_repeat"]))
    lines = (tmp_path / pz.RESULTS_CSV).read_text().splitlines()
    assert lines[0].startswith("worker,n_images,shots,repeat") and len(lines) == 1 + 3 * 2 * 3
    table = (tmp_path / pz.RESULTS_MD).read_text()
    assert "| model | 4 images | 8 images |" in table and "| TANet, fine-tuned per worker |" in table
    assert " ± " in table
    record = json.loads(next((tmp_path / pz.WORKERS_DIR).iterdir()).read_text())
    for k in ("4", "8"):
        for draw in record["shots"][k]["draws"]:
            assert draw["n_train"] == int(k) and draw["n_train"] + draw["n_test"] == record["n_images"]


def test_draws_are_seeded_per_worker_shot_and_repeat():
    a = pz.draw_seed(0, "A1", 10, 0).generate_state(2)
    assert np.array_equal(a, pz.draw_seed(0, "A1", 10, 0).generate_state(2))
    for other in (pz.draw_seed(1, "A1", 10, 0), pz.draw_seed(0, "A2", 10, 0), pz.draw_seed(0, "A1", 100, 0),
                  pz.draw_seed(0, "A1", 10, 1)):
        assert not np.array_equal(a, other.generate_state(2))


def test_a_worker_with_too_few_images_is_left_out_of_that_row(tiny_run, tmp_path):
    split, features, heads, *_ = tiny_run
    protocol = pz.Protocol(shots=(4, 12), repeats=1, min_test_images=5, recipe=pz.Recipe(epochs=1))
    table = run(split, features, heads, tmp_path, protocol)["table"]
    assert table["4"]["workers"] == 3
    assert table["12"]["workers"] == 0 and len(table["12"]["skipped_workers"]) == 3
    assert "| test workers | 3 | 0 |" in (tmp_path / pz.RESULTS_MD).read_text()


def test_workers_whose_srcc_is_undefined_in_every_draw_are_not_counted():
    """personalized.md's "test workers" counts the workers in the means, not those left out of every draw."""
    protocol = pz.Protocol(shots=(4,), repeats=2, min_test_images=5)
    nan = float("nan")

    def record(worker, pairs):
        return {"worker": worker, "n_images": 20, "shots": {"4": {"draws": [
            {"repeat": r, "n_train": 4, "n_test": 16, "generic_srcc": g, "finetuned_srcc": f}
            for r, (g, f) in enumerate(pairs)]}}}

    records = [record("A1", [(0.1, 0.3), (0.2, 0.4)]), record("A2", [(nan, nan), (nan, nan)]),
               record("A3", [(nan, 0.5), (0.3, nan)]), record("A4", [(0.5, 0.5), (nan, nan)])]
    table = pz.summarize(records, protocol)["4"]
    assert table["workers"] == 2 and table["undefined_workers"] == ["A2", "A3"]
    assert table["finetuned"]["per_repeat"] == pytest.approx([0.4, 0.4])
    text = pz.markdown_table(pz.summarize(records, protocol), protocol,
                             {"data": "tiny", "generic": "tiny", "eval_batch_size": 8})
    assert "| test workers | 2 of 4 |" in text
    assert "k = 4: 2 test workers (A2, A3) had an undefined SRCC in every draw" in text


def test_a_killed_run_resumes_to_the_uninterrupted_table(tiny_run, tmp_path, monkeypatch):
    split, features, heads, *_ = tiny_run
    whole = run(split, features, heads, tmp_path / "whole")
    recorded, computed = pz.ResultStore.record, []

    def dies_after_two(self, result):
        if len(list((self.out / pz.WORKERS_DIR).glob("*.json"))) == 2:
            raise KeyboardInterrupt
        recorded(self, result)

    monkeypatch.setattr(pz.ResultStore, "record", dies_after_two)
    with pytest.raises(KeyboardInterrupt):
        run(split, features, heads, tmp_path / "killed")
    assert len(list((tmp_path / "killed" / pz.WORKERS_DIR).glob("*.json"))) == 2
    assert not (tmp_path / "killed" / pz.RESULTS_JSON).exists()
    monkeypatch.setattr(pz.ResultStore, "record", recorded)
    evaluate = pz.evaluate_worker
    monkeypatch.setattr(pz, "evaluate_worker", lambda worker, *a: computed.append(worker) or evaluate(worker, *a))
    resumed = run(split, features, heads, tmp_path / "killed")
    assert len(computed) == 1  # only the worker not done
    assert resumed["table"] == whole["table"]
    for name in (pz.RESULTS_MD, pz.RESULTS_CSV):
        assert (tmp_path / "killed" / name).read_text() == (tmp_path / "whole" / name).read_text()


def test_run_folder_of_other_settings_or_files_is_refused(tmp_path):
    pz.ResultStore(tmp_path / "a", settings(seed=0)).open()
    with pytest.raises(pz.ProtocolError, match="holds a run with other settings"):
        pz.ResultStore(tmp_path / "a", settings(seed=1)).open()
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / pz.RESULTS_MD).write_text("mine")
    with pytest.raises(pz.ProtocolError, match="never overwritten"):
        pz.ResultStore(tmp_path / "b", settings()).open()
    assert (tmp_path / "b" / pz.RESULTS_MD).read_text() == "mine"


def test_protocol_settings_are_checked():
    with pytest.raises(ValueError, match="--shots"):
        pz.Protocol(shots=(10, 10))
    with pytest.raises(ValueError, match="--repeats"):
        pz.Protocol(repeats=0)
    with pytest.raises(ValueError, match="--finetune"):
        pz.Recipe(parts="everything")


# --------------------------------------------------------------------------- the command

def tool(*argv, **kwargs):
    return subprocess.run([sys.executable, str(REPO / "tools" / "paper_tables.py"), "personalized", *argv],
                          cwd=REPO, capture_output=True, text=True, **kwargs)


def load_tool():
    spec = importlib.util.spec_from_file_location("paper_tables", REPO / "tools" / "paper_tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


paper_tables = load_tool()


@pytest.fixture(scope="module")
def generic_checkpoint(tmp_path_factory):
    """A TANet (random weights) saved as a training checkpoint: what --generic takes."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("generic") / "best.pth"
    atomic_torch_save({"model": TANet().state_dict(), "variant": "tad66k", "options": {"eval_batch_size": 8}}, path)
    return path


def test_the_command_says_what_it_needs(tmp_path, tiny_data, capsys):
    assert paper_tables.main(["personalized", "--flickr_dir", str(tiny_data), "--out", str(tmp_path / "o")]) == 1
    assert "needs --test_workers FILE" in capsys.readouterr().err
    assert paper_tables.main(["personalized", "--flickr_dir", str(tmp_path), "--test_workers",
                              str(tiny_data / "test_workers.txt"), "--out", str(tmp_path / "o")]) == 1
    assert "holds no FLICKR-AES_image_labeled_by_each_worker.csv" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_the_demo_is_never_generated_over_the_users_files(tmp_path, capsys):
    """--demo_dir naming a folder of the user's: one line naming it and the file, nothing written."""
    mine = tmp_path / "mine"
    (mine / "40K").mkdir(parents=True)
    (mine / "40K" / "farm1_255_19451034153_6d1a7f0a5c_b.jpg").write_bytes(b"a photo")
    (mine / "40K" / "test_workers.txt").write_text("A1\n")
    assert paper_tables.main(["personalized", "--dataset", "demo", "--demo_dir", str(mine), "--out",
                              str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{mine} holds 40K/farm1_255_19451034153_6d1a7f0a5c_b.jpg, which" in err
    assert sorted(p.name for p in mine.rglob("*")) == ["40K", "farm1_255_19451034153_6d1a7f0a5c_b.jpg",
                                                        "test_workers.txt"]
    assert (mine / "40K" / "test_workers.txt").read_text() == "A1\n" and not (tmp_path / "o").exists()


def test_the_command_writes_the_table_and_resumes(tmp_path, tiny_data, monkeypatch, capsys):
    """The command line in this process with the tiny model standing in for the checkpoint's TANet."""
    def tiny_tanet(path, **_):
        torch.manual_seed(0)
        model = TinyTANet()
        model.variant = "tad66k"
        return model, {"options": {"eval_batch_size": 8}}

    monkeypatch.setattr(paper_tables, "load_tanet", tiny_tanet)
    (tmp_path / "generic.pth").write_bytes(b"stand-in")
    argv = ["personalized", "--flickr_dir", str(tiny_data), "--test_workers", str(tiny_data / "test_workers.txt"),
            "--generic", str(tmp_path / "generic.pth"), "--shots", "4", "--repeats", "2", "--min_test_images", "5",
            "--ft_epochs", "3", "--no-fold_bn", "--num_workers", "0", "--device", "cpu", "--out", str(tmp_path / "o")]
    assert paper_tables.main(argv) == 0
    shown = capsys.readouterr().out
    assert "| model | 4 images |" in shown and "personalized_workers.csv" in shown
    assert json.loads((tmp_path / "o" / pz.RESULTS_JSON).read_text())["counts"]["test_workers"] == 3
    table = (tmp_path / "o" / pz.RESULTS_MD).read_text()
    assert paper_tables.main(argv) == 0  # everything recorded: the same table again
    assert (tmp_path / "o" / pz.RESULTS_MD).read_text() == table
    assert paper_tables.main(argv[:-1] + [str(tmp_path / "o"), "--seed", "1"]) == 1
    assert "other settings (protocol differ)" in capsys.readouterr().err


def tiny_tanet(path, **_):
    torch.manual_seed(0)
    model = TinyTANet()
    model.variant = "tad66k"
    return model, {"options": {"eval_batch_size": 8}}


def _tiny_personalized(tmp_path, tiny_data, monkeypatch) -> tuple:
    """(a copy of the tiny FLICKR-AES data, the personalized command's argv on it with a stand-in generic model)."""
    import shutil

    monkeypatch.setattr(paper_tables, "load_tanet", tiny_tanet)
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    (tmp_path / "generic.pth").write_bytes(b"stand-in")
    return data, ["personalized", "--flickr_dir", str(data), "--test_workers", str(data / "test_workers.txt"),
                  "--generic", str(tmp_path / "generic.pth"), "--shots", "4", "--repeats", "1",
                  "--min_test_images", "5", "--num_workers", "0", "--device", "cpu", "--quiet"]


def test_a_rerun_on_other_images_is_refused(tmp_path, tiny_data, monkeypatch, capsys):
    """The features are computed once and recorded: a rerun into the same --out after the images changed,
    or with another --path_to_images, is refused with one line saying how to start fresh."""
    import shutil

    data, argv = _tiny_personalized(tmp_path, tiny_data, monkeypatch)
    argv += ["--ft_epochs", "1", "--no-fold_bn", "--out", str(tmp_path / "o")]
    assert paper_tables.main(argv) == 0
    table = (tmp_path / "o" / pz.RESULTS_MD).read_text()
    capsys.readouterr()
    shutil.copytree(data / "40K", tmp_path / "other")
    assert paper_tables.main(argv + ["--path_to_images", str(tmp_path / "other")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "other images" in err and str(tmp_path / "other") in err and "another --out" in err
    for image in (data / "40K").iterdir():  # every image's content changes (and its size)
        with Image.open(image) as img:
            img.rotate(90).save(image, quality=50)
    assert paper_tables.main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "other images" in err and "another --out" in err
    assert (tmp_path / "o" / pz.RESULTS_MD).read_text() == table  # nothing of the run was changed


def test_messages_suggest_only_options_of_the_command(tmp_path, tiny_data, monkeypatch, capsys):
    """personalized has no --skip_missing or --skip_bad; --download and --checkpoints_dir it has."""
    data, argv = _tiny_personalized(tmp_path, tiny_data, monkeypatch)
    test_image = data / "40K" / load_split(data, data / "test_workers.txt").test["image"].iloc[0]
    test_image.write_bytes(b"not an image")
    assert paper_tables.main(argv + ["--out", str(tmp_path / "o1")]) == 1
    err = capsys.readouterr().err
    assert "cannot be decoded" in err and "--check_images exists" in err and "--skip_bad" not in err
    test_image.unlink()
    assert paper_tables.main(argv + ["--out", str(tmp_path / "o2")]) == 1
    err = capsys.readouterr().err
    assert "missing" in err and "--path_to_images" in err and "--skip_missing" not in err
    released = (argv[:argv.index("--generic") + 1] + ["SRCC_513_LCC_531_MSE_016.pth"]
                + argv[argv.index("--generic") + 2:])
    assert paper_tables.main(released + ["--checkpoints_dir", str(tmp_path / "none"),
                                         "--out", str(tmp_path / "o3")]) == 1
    err = capsys.readouterr().err
    assert str(tmp_path / "none") in err and "--download" in err
    args = paper_tables.build_parser().parse_args(released + ["--download", "--out", str(tmp_path / "o3")])
    assert args.download and args.checkpoints_dir is None


@pytest.mark.parametrize("code, again", [(1, False), (2, False), (130, True), (-9, True)])
def test_a_failed_generic_training_says_run_again_only_where_it_helps(tmp_path, monkeypatch, code, again):
    args = paper_tables.build_parser().parse_args(["personalized", "--dataset", "demo", "--out", str(tmp_path)])
    signal_part = f"import os, signal; os.kill(os.getpid(), {-code})" if code < 0 else f"raise SystemExit({code})"
    monkeypatch.setattr(paper_tables, "generic_training_command",
                        lambda *a: [sys.executable, "-c", f"import sys; print('error: no data', file=sys.stderr); "
                                                          f"{signal_part}"])
    with pytest.raises(RuntimeError) as err:
        paper_tables.generic_checkpoint(args, tmp_path, tmp_path / "w.txt", tmp_path)
    assert ("run the same command again" in str(err.value)) == again, str(err.value)


def test_the_generic_training_command_uses_the_demos_recipe(tmp_path):
    args = paper_tables.build_parser().parse_args(["personalized", "--dataset", "demo", "--out", str(tmp_path),
                                                   "--generic_epochs", "2", "--device", "cpu"])
    cmd = paper_tables.generic_training_command(args, tmp_path / "d", tmp_path / "d" / "w.txt", tmp_path / "g")
    joined = " ".join(cmd)
    assert "main_nni.py --dataset flickr_aes" in joined and "--resume" in cmd
    assert "--backbones random" in joined and "--init_lr_res365_last 0.0" in joined and "--channels_last" in cmd
    last = max(i for i, a in enumerate(cmd) if a == "--num_epoch")
    assert cmd[last + 1] == "2"  # after the demo recipe's 4: the one argparse keeps


@pytest.mark.slow
def test_the_command_survives_sigkill_and_ends_with_the_same_table(tiny_data, generic_checkpoint, tmp_path):
    """Real TANet features of 45 images, then the workers; killed after the first worker's record."""
    common = ["--flickr_dir", str(tiny_data), "--test_workers", str(tiny_data / "test_workers.txt"), "--generic",
              str(generic_checkpoint), "--shots", "4", "8", "--repeats", "3", "--min_test_images", "5",
              "--ft_epochs", "300", "--device", "cpu", "--num_workers", "0", "--quiet"]  # seconds a worker
    whole = tool(*common, "--out", str(tmp_path / "whole"), timeout=600)
    assert whole.returncode == 0, whole.stderr
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(REPO / "tools" / "paper_tables.py"), "personalized", *common,
                             "--out", str(killed)], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while proc.poll() is None and not list((killed / pz.WORKERS_DIR).glob("*.json")):
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    done = len(list((killed / pz.WORKERS_DIR).glob("*.json")))
    assert 1 <= done and not (killed / pz.RESULTS_MD).exists(), "killed too late to test resuming"
    again = tool(*common, "--out", str(killed), timeout=600)
    assert again.returncode == 0, again.stderr
    for name in (pz.RESULTS_MD, pz.RESULTS_CSV):
        assert (killed / name).read_text() == (tmp_path / "whole" / name).read_text()
    assert json.loads((killed / pz.RESULTS_JSON).read_text())["table"] == \
        json.loads((tmp_path / "whole" / pz.RESULTS_JSON).read_text())["table"]
    assert "| TANet, generic (before fine-tuning) |" in whole.stdout


@pytest.mark.slow
def test_the_demo_command_trains_the_generic_model_then_makes_the_table(personal_root, tmp_path, monkeypatch):
    """--dataset demo without --generic: main_nni.py trains TANet (1 epoch here) in OUT/generic first."""
    monkeypatch.setattr(paper_tables, "ensure_personal_dataset", lambda root: personal_root)
    argv = ["personalized", "--dataset", "demo", "--generic_epochs", "1", "--shots", "4", "--repeats", "2",
            "--min_test_images", "5", "--device", "cpu", "--num_workers", "0", "--quiet", "--out", str(tmp_path / "o")]
    assert paper_tables.main(argv) == 0
    generic = tmp_path / "o" / paper_tables.GENERIC_DIR
    assert (generic / "results.json").is_file() and (generic / "last.pth").is_file()  # best.pth: if val SRCC is defined
    options = json.loads((generic / "results.json").read_text())
    assert options["dataset"] == "flickr_aes" and len(options["history"]) == 1
    table = (tmp_path / "o" / pz.RESULTS_MD).read_text()
    stamp = (generic / "last.pth").stat().st_mtime_ns
    assert paper_tables.main(argv) == 0  # trained and recorded: nothing is redone
    assert (generic / "last.pth").stat().st_mtime_ns == stamp
    assert (tmp_path / "o" / pz.RESULTS_MD).read_text() == table
