"""imagedata/demo_data.py: deterministic, cached, self-repairing generation of a learnable themed data set."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy import ndimage, stats

from imagedata import demo_data
from dataset import read_score_csv, read_theme_csvs

SMALL = dict(n_train=8, n_test=4, size=64)


def all_files(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.name.startswith(".")}


def test_layout_and_csvs(tmp_path):
    root = demo_data.ensure_demo_dataset(tmp_path / "demo", **SMALL)
    assert root == tmp_path / "demo"
    train, test = read_score_csv(root / "merge" / "train.csv"), read_score_csv(root / "merge" / "test.csv")
    assert (len(train), len(test)) == (8, 4) and set(train["image"]).isdisjoint(test["image"])
    themes = read_theme_csvs(root / "unmerge" / "train", root / "unmerge" / "test")
    assert set(themes) == set(train["image"]) | set(test["image"])
    assert sorted(pd.Series([themes[n] for n in train["image"]]).value_counts().tolist()) == [2, 2, 2, 2]
    for split, df in (("train", train), ("test", test)):
        for theme in set(themes.values()):
            part = pd.read_csv(root / "unmerge" / split / f"{theme}.csv")
            assert part.set_index("image")["score"].to_dict() == {
                n: s for n, s in zip(df["image"], df["score"]) if themes[n] == theme}
    for name in train["image"]:
        img = Image.open(root / "images" / name)
        assert img.format == "JPEG" and img.mode == "RGB" and img.size == (64, 64)
    assert set(themes.values()) == set(demo_data.THEMES)


def test_same_seed_gives_byte_identical_files(tmp_path):
    a = all_files(demo_data.ensure_demo_dataset(tmp_path / "a", seed=3, **SMALL))
    b = all_files(demo_data.ensure_demo_dataset(tmp_path / "b", seed=3, **SMALL))
    c = all_files(demo_data.ensure_demo_dataset(tmp_path / "c", seed=4, **SMALL))
    assert a == b
    assert len(a) == 8 + 4 + 2 + 8 + 1  # images, merge CSVs, unmerge CSVs (4 themes x 2 splits), manifest
    assert a["merge/train.csv"] != c["merge/train.csv"]


def test_complete_data_is_reused(tmp_path):
    root = demo_data.ensure_demo_dataset(tmp_path / "d", **SMALL)
    stamps = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
    demo_data.ensure_demo_dataset(tmp_path / "d", **SMALL)
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()} == stamps


@pytest.mark.parametrize("damage", ["delete_image", "delete_csv"])
def test_incomplete_data_is_regenerated(tmp_path, damage):
    root = demo_data.ensure_demo_dataset(tmp_path / "d", **SMALL)
    before = all_files(root)
    if damage == "delete_image":
        (root / "images" / "demo_00003.jpg").unlink()
    else:
        (root / "unmerge" / "test" / "mono.csv").unlink()
    demo_data.ensure_demo_dataset(tmp_path / "d", **SMALL)
    assert all_files(root) == before


def snapshot(root):
    """Every file under root (hidden ones included) with its bytes and modification time."""
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))
            if p.is_file()}


def refused(root, first, **kwargs):
    """ensure_demo_dataset(root) refuses with one line naming the folder and the first foreign file, and
    leaves every file as it was."""
    before = snapshot(root)
    with pytest.raises(ValueError) as err:
        demo_data.ensure_demo_dataset(root, **{**SMALL, **kwargs})
    message = str(err.value)
    assert "\n" not in message and str(root) in message and first in message, message
    assert snapshot(root) == before
    return message


def test_a_folder_of_the_users_data_is_refused_and_left_as_it_was(tmp_path):
    """A copy of TAD66K (merge/, unmerge/ CSVs of the generator's names, images/) is never touched."""
    root = tmp_path / "TAD66K"
    for rel in ("merge/train.csv", "merge/test.csv", "unmerge/train/cat.csv", "unmerge/test/mono.csv"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("image,score\nmine.jpg,5.0\n")
    (root / "images").mkdir()
    (root / "images" / "demo_00001.jpg").write_bytes(b"my photo")
    message = refused(root, "images/demo_00001.jpg")
    assert "did not write" in message


@pytest.mark.parametrize("damage", ["changed_image", "own_file", "no_manifest", "bad_manifest", "symlink"])
def test_a_generated_folder_holding_anything_else_is_refused(tmp_path, damage):
    """Even where the data must be made again (other parameters), only files the manifest lists with the
    sizes and digests written are removed; a folder with anything else is left as it is."""
    root = demo_data.ensure_demo_dataset(tmp_path / "d", **SMALL)
    first = {"changed_image": "images/demo_00003.jpg", "own_file": "images/holiday.jpg",
             "no_manifest": "images/demo_00000.jpg", "bad_manifest": "manifest.json",
             "symlink": "merge/link.csv"}[damage]
    if damage == "changed_image":  # same size, other bytes: not what the generator wrote
        data = bytearray((root / first).read_bytes())
        data[-3] ^= 0xFF
        (root / first).write_bytes(bytes(data))
    elif damage == "own_file":
        (root / first).write_bytes(b"mine")
    elif damage == "no_manifest":
        (root / "manifest.json").unlink()
    elif damage == "bad_manifest":
        (root / "manifest.json").write_text("{")
    else:
        (root / first).symlink_to(tmp_path / "elsewhere.csv")
    refused(root, first, n_train=4)


def test_an_interrupted_generation_is_finished_by_the_next_call(tmp_path, monkeypatch):
    """Killed after two images: the files written so far are the generator's own (its journal lists them),
    so the next call removes and remakes them; the result equals an uninterrupted generation."""
    render = demo_data.render_image
    count = []

    def dies_on_the_third(*args, **kwargs):
        if len(count) == 2:
            raise KeyboardInterrupt
        count.append(1)
        return render(*args, **kwargs)

    monkeypatch.setattr(demo_data, "render_image", dies_on_the_third)
    with pytest.raises(KeyboardInterrupt):
        demo_data.ensure_demo_dataset(tmp_path / "d", **SMALL)
    assert len(list((tmp_path / "d" / "images").glob("*.jpg"))) == 2
    assert not (tmp_path / "d" / "manifest.json").exists()
    (tmp_path / "d" / "images" / ".demo_00001.jpg.0123456789ab.tmp").write_bytes(b"partial")  # a killed write
    monkeypatch.setattr(demo_data, "render_image", render)
    again = demo_data.ensure_demo_dataset(tmp_path / "d", **SMALL)
    assert snapshot_names(again) == snapshot_names(demo_data.ensure_demo_dataset(tmp_path / "fresh", **SMALL))
    assert all_files(again) == all_files(tmp_path / "fresh")


def snapshot_names(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_a_manifest_of_an_earlier_version_still_vouches_for_its_files(tmp_path):
    """Manifests written before digests were recorded list sizes only; their files are still removed."""
    root = demo_data.ensure_demo_dataset(tmp_path / "d", **SMALL)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest.pop("sha256")
    (root / "manifest.json").write_text(json.dumps(manifest))
    (root / ".generate.lock").write_bytes(b"")  # the lock file earlier versions left
    demo_data.ensure_demo_dataset(root, n_train=4, n_test=4, size=64)
    assert all_files(root) == all_files(demo_data.ensure_demo_dataset(tmp_path / "fresh", n_train=4, n_test=4,
                                                                     size=64))


def test_other_parameters_regenerate_and_remove_stale_files(tmp_path):
    root = demo_data.ensure_demo_dataset(tmp_path / "d", **SMALL)
    demo_data.ensure_demo_dataset(root, n_train=4, n_test=4, size=64)
    assert len(list((root / "images").glob("*.jpg"))) == 8
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["params"]["n_train"] == 4 and len(manifest["files"]) == 8 + 2 + 8
    assert all_files(root) == all_files(demo_data.ensure_demo_dataset(tmp_path / "fresh", n_train=4, n_test=4,
                                                                     size=64))


def test_default_root_is_inside_the_repo():
    assert demo_data.DEFAULT_DEMO_ROOT == demo_data.REPO_DIR / "data" / "demo"
    assert (demo_data.REPO_DIR / "imagedata" / "demo_data.py").is_file()


@pytest.mark.parametrize("kwargs", [dict(n_train=0), dict(n_test=-1), dict(size=8), dict(seed=-1),
                                    dict(n_train=2.5)])
def test_bad_parameters_are_refused(tmp_path, kwargs):
    with pytest.raises(ValueError, match="demo data"):
        demo_data.ensure_demo_dataset(tmp_path, **kwargs)


def test_the_rule_depends_on_the_theme():
    params = dict(saturation=0.5, blur=0.5, noise=0.5, jpeg=0.5)
    dark = {t: demo_data.theme_score(t, exposure=0.0, **params) for t in demo_data.THEMES}
    bright = {t: demo_data.theme_score(t, exposure=1.0, **params) for t in demo_data.THEMES}
    assert bright["architecture"] - dark["architecture"] > 5  # bright is good here
    assert dark["flower"] - bright["flower"] > 5  # dark (low-key) is good here
    clean = dict(exposure=0.5, saturation=0.5, blur=0.0, jpeg=0.5)
    assert demo_data.theme_score("mono", noise=1.0, **clean) > demo_data.theme_score("mono", noise=0.0, **clean) + 3
    assert demo_data.theme_score("vintage", noise=1.0, **clean) < demo_data.theme_score("vintage", noise=0.0, **clean)
    scores = [demo_data.theme_score(t, *np.random.default_rng(i).random(5)) for i, t in
              enumerate(demo_data.THEMES * 50)]
    assert min(scores) >= 1.0 and max(scores) <= 10.0 and np.std(scores) > 1.5


def _features(path):
    """Simple global statistics: brightness, contrast, saturation, noise level, coarse and fine sharpness."""
    x = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0
    lum = x @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    sat = ((x.max(axis=2) - x.min(axis=2)) / (x.max(axis=2) + 1e-3)).mean()
    noise = np.median(np.abs(lum - ndimage.uniform_filter(lum, 3)))
    h = lum.shape[0] // 4
    coarse = lum[:h * 4, :h * 4].reshape(h, 4, h, 4).mean(axis=(1, 3))
    return [lum.mean(), lum.std(), sat, noise, np.log(ndimage.laplace(coarse).var() + 1e-6),
            np.log(ndimage.laplace(lum).var() + 1e-6)]


@pytest.mark.slow
def test_learnable_from_simple_statistics_given_the_theme(tmp_path):
    """A linear model on global image statistics ranks the test images well only when it knows the theme."""
    from sklearn.linear_model import RidgeCV

    root = demo_data.ensure_demo_dataset(tmp_path / "d", n_train=160, n_test=80, size=128)
    themes = read_theme_csvs(root / "unmerge" / "train", root / "unmerge" / "test")

    def load(split):
        df = read_score_csv(root / "merge" / f"{split}.csv")
        x = np.array([_features(root / "images" / n) for n in df["image"]])
        onehot = np.array([[themes[n] == t for t in demo_data.THEMES] for n in df["image"]], dtype=float)
        with_theme = np.hstack([x] + [onehot[:, [k]] * np.hstack([np.ones((len(x), 1)), x])
                                      for k in range(len(demo_data.THEMES))])
        return x, with_theme, df["score"].to_numpy()

    x_tr, xt_tr, y_tr = load("train")
    x_te, xt_te, y_te = load("test")
    alphas = np.logspace(-4, 2, 13)
    srcc_theme = stats.spearmanr(RidgeCV(alphas=alphas).fit(xt_tr, y_tr).predict(xt_te), y_te)[0]
    srcc_plain = stats.spearmanr(RidgeCV(alphas=alphas).fit(x_tr, y_tr).predict(x_te), y_te)[0]
    print(f'SRCC with theme {srcc_theme:.3f}, without {srcc_plain:.3f}')
    assert srcc_theme > 0.8
    assert srcc_plain < srcc_theme - 0.3


@pytest.mark.parametrize("tool, args", [("gpu_checks.py", ["--skip", "ddp", "bench", "cache"]),
                                        ("benchmark.py", ["--accuracy", "--skip", "train", "eval", "data"])])
def test_the_tools_refuse_a_demo_root_of_the_users_data_in_one_line(tool, args, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    user = tmp_path / "mine"
    (user / "merge").mkdir(parents=True)
    (user / "merge" / "train.csv").write_text("image,score\na.jpg,5\n")
    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, str(repo / "tools" / tool), "--demo_root", str(user),
                           "--out" if tool == "gpu_checks.py" else "--json", str(tmp_path / "out"), *args],
                          capture_output=True, text=True, timeout=600, cwd=repo)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(f"{tool}: error: {user} holds merge/train.csv")
    assert "Traceback" not in done.stderr
    assert [p.name for p in user.rglob("*")] == ["merge", "train.csv"]
