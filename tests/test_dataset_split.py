"""dataset.py: the carved validation split and build_datasets for every data set name."""
from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import dataset as ds
from dataset import DataError
from imagedata.image_check import check_images

AVA_HEADER = "image_id,score2,score3,score4,score5,score6,score7,score8,score9,score10,score11,tag1,tag2,tag3\n"


def write_csv(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def write_images(folder, names):
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        Image.new("RGB", (20, 30), (i * 20 % 256, 100, 50)).save(folder / name)


def themed_csv(path, counts, seed=0):
    """image,score CSV with counts[theme] images per theme; returns (path, image -> theme)."""
    rng = np.random.default_rng(seed)
    rows, themes = [], {}
    for theme, n in counts.items():
        for k in range(n):
            name = f"{theme}_{k:03d}.jpg"
            rows.append((name, round(float(rng.uniform(1, 10)), 2)))
            themes[name] = theme
    order = rng.permutation(len(rows))
    text = "image,score\n" + "".join(f"{rows[i][0]},{rows[i][1]}\n" for i in order)
    return write_csv(path, text), themes


# --------------------------------------------------------------------------- make_validation_split

def test_split_is_disjoint_complete_and_keeps_rows(tmp_path):
    csv, themes = themed_csv(tmp_path / "train.csv", {"cat": 30, "dog": 20, "sky": 10})
    tr, va = ds.make_validation_split(csv, tmp_path / "out", fraction=0.1, seed=0, themes=themes)
    assert (tr.name, va.name) == ("train_split.csv", "val_split.csv") and tr.parent == tmp_path / "out"
    orig, a, b = pd.read_csv(csv), pd.read_csv(tr), pd.read_csv(va)
    assert len(b) == 6 and len(a) == 54
    assert set(a["image"]).isdisjoint(b["image"])
    merged = pd.concat([a, b]).set_index("image").loc[orig["image"]]
    assert merged["score"].tolist() == orig["score"].tolist()
    # rows keep their original order in each file
    pos = {n: i for i, n in enumerate(orig["image"])}
    assert [pos[n] for n in a["image"]] == sorted(pos[n] for n in a["image"])


def test_split_is_stratified_by_theme(tmp_path):
    csv, themes = themed_csv(tmp_path / "train.csv", {"cat": 50, "dog": 30, "sky": 20})
    _, va = ds.make_validation_split(csv, tmp_path, fraction=0.2, seed=3, themes=themes)
    counts = pd.read_csv(va)["image"].map(themes).value_counts().to_dict()
    assert counts == {"cat": 10, "dog": 6, "sky": 4}


def test_split_uses_the_theme_column(tmp_path):
    rows = "".join(f"x{i}.jpg,5,{'a' if i < 40 else 'b'}\n" for i in range(50))
    csv = write_csv(tmp_path / "t.csv", "image,score,theme\n" + rows)
    _, va = ds.make_validation_split(csv, tmp_path / "o", fraction=0.2, seed=0)
    assert pd.read_csv(va)["theme"].value_counts().to_dict() == {"a": 8, "b": 2}
    assert json.loads((tmp_path / "o" / "split_info.json").read_text())["stratified_by_theme"] is True


def test_split_is_deterministic_and_seeded(tmp_path):
    csv, themes = themed_csv(tmp_path / "train.csv", {"cat": 40, "dog": 40})
    a = ds.make_validation_split(csv, tmp_path / "a", seed=7, themes=themes)
    b = ds.make_validation_split(csv, tmp_path / "b", seed=7, themes=themes)
    c = ds.make_validation_split(csv, tmp_path / "c", seed=8, themes=themes)
    assert a[1].read_bytes() == b[1].read_bytes() and a[0].read_bytes() == b[0].read_bytes()
    assert a[1].read_bytes() != c[1].read_bytes()


def test_split_is_reused_when_inputs_are_the_same(tmp_path):
    csv, themes = themed_csv(tmp_path / "train.csv", {"cat": 40})
    tr, va = ds.make_validation_split(csv, tmp_path / "o", seed=1)
    stamps = [p.stat().st_mtime_ns for p in (tr, va, tmp_path / "o" / "split_info.json")]
    inodes = [p.stat().st_ino for p in (tr, va)]
    assert ds.make_validation_split(csv, tmp_path / "o", seed=1) == (tr, va)
    assert [p.stat().st_mtime_ns for p in (tr, va, tmp_path / "o" / "split_info.json")] == stamps
    assert [p.stat().st_ino for p in (tr, va)] == inodes
    info = json.loads((tmp_path / "o" / "split_info.json").read_text())
    assert info["seed"] == 1 and info["fraction"] == 0.1 and info["n_val"] == 4 and info["n_train"] == 36
    assert info["stratified_by_theme"] is False


@pytest.mark.parametrize("change", ["fraction", "seed", "csv", "themes", "deleted"])
def test_split_is_rebuilt_when_something_changed(tmp_path, change):
    csv, themes = themed_csv(tmp_path / "train.csv", {"cat": 30, "dog": 30})
    out = tmp_path / "o"
    tr, va = ds.make_validation_split(csv, out, fraction=0.1, seed=0, themes=themes)
    before = va.read_bytes()
    kwargs = dict(fraction=0.1, seed=0, themes=themes)
    if change == "fraction":
        kwargs["fraction"] = 0.2
    elif change == "seed":
        kwargs["seed"] = 1
    elif change == "csv":
        themed_csv(csv, {"cat": 30, "dog": 31})
        themes = {**themes, "dog_030.jpg": "dog"}
        kwargs["themes"] = themes
    elif change == "themes":
        kwargs["themes"] = {n: "one" for n in themes}
    elif change == "deleted":
        va.unlink()
    ds.make_validation_split(csv, out, **kwargs)
    after = va.read_bytes()
    rows = pd.read_csv(va)
    if change == "deleted":
        assert after == before  # restored
    else:
        assert after != before
        info = json.loads((out / "split_info.json").read_text())
        assert info["val_sha256"] == ds.sha256_file(va)
    assert len(rows) + len(pd.read_csv(tr)) == len(pd.read_csv(csv))


def test_split_leaves_no_temp_files(tmp_path):
    csv, _ = themed_csv(tmp_path / "train.csv", {"cat": 10})
    ds.make_validation_split(csv, tmp_path / "o")
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["split_info.json", "train_split.csv",
                                                                   "val_split.csv"]


def test_split_rejects_bad_arguments(tmp_path):
    csv, _ = themed_csv(tmp_path / "train.csv", {"cat": 10})
    for fraction in (0, 1, 1.5, -0.1):
        with pytest.raises(ValueError, match="fraction"):
            ds.make_validation_split(csv, tmp_path, fraction=fraction)
    with pytest.raises(ValueError, match="seed"):
        ds.make_validation_split(csv, tmp_path, seed=-1)
    one = write_csv(tmp_path / "one.csv", "image,score\na.jpg,5\n")
    with pytest.raises(DataError, match="at least 2"):
        ds.make_validation_split(one, tmp_path)


def test_split_always_leaves_images_on_both_sides(tmp_path):
    csv = write_csv(tmp_path / "two.csv", "image,score\na.jpg,5\nb.jpg,6\n")
    tr, va = ds.make_validation_split(csv, tmp_path, fraction=0.01)
    assert len(pd.read_csv(tr)) == 1 and len(pd.read_csv(va)) == 1


# --------------------------------------------------------------------------- build_datasets: tad66k

def make_tad66k(root):
    """A tiny TAD66K-layout folder: 12 train + 4 test images in two themes."""
    train = [(f"t{i}.jpg", 1 + i * 0.5, "cat" if i % 2 else "dog") for i in range(12)]
    test = [(f"s{i}.jpg", 2 + i, "cat" if i % 2 else "dog") for i in range(4)]
    for split, rows in (("train", train), ("test", test)):
        write_csv(root / "merge" / f"{split}.csv", "image,score\n" + "".join(f"{n},{s}\n" for n, s, _ in rows))
        for theme in ("cat", "dog"):
            write_csv(root / "unmerge" / split / f"{theme}.csv",
                      "image,score\n" + "".join(f"{n},{s}\n" for n, s, t in rows if t == theme))
    write_images(root / "images", [n for n, _, _ in train + test])
    return root


def test_build_tad66k_with_carved_validation(tmp_path):
    root = make_tad66k(tmp_path / "TAD66K")
    sets = ds.build_datasets("tad66k", distribution=False, image_dir=root / "images", csv_dir=root,
                             val_fraction=0.25, seed=0)
    assert set(sets) == {"train", "val", "test"}
    assert (len(sets["train"]), len(sets["val"]), len(sets["test"])) == (9, 3, 4)
    assert sorted(p.name for p in (root / "merge").iterdir()) == ["test.csv", "train.csv"]  # nothing written there
    assert sets["val"].source == root / "merge" / "train.csv" and sets["val"].rows != sets["train"].rows[:3]
    assert sets["train"].train and not sets["val"].train and not sets["test"].train
    assert set(sets["val"].names).isdisjoint(sets["train"].names)
    assert sets["test"].themes == ["dog", "cat", "dog", "cat"]
    item = sets["val"][0]
    assert item["theme"] in ("cat", "dog") and item["target"].shape == (1,)
    assert item["target"].item() == pytest.approx(item["score"] / 10)
    assert sets["train"][0]["image"].shape == (3, 224, 224)


def test_build_tad66k_test_as_validation_and_split_dir(tmp_path):
    root = make_tad66k(tmp_path / "TAD66K")
    sets = ds.build_datasets("tad66k", distribution=False, image_dir=root / "images", csv_dir=root,
                             validation="test")
    assert len(sets["train"]) == 12 and sets["val"].names == sets["test"].names
    assert not (root / "merge" / "val_split.csv").exists()
    ds.build_datasets("tad66k", distribution=False, image_dir=root / "images", csv_dir=root,
                      split_dir=tmp_path / "splits")
    assert (tmp_path / "splits" / "val_split.csv").is_file() and not (root / "merge" / "val_split.csv").exists()


def test_build_tad66k_errors(tmp_path):
    root = make_tad66k(tmp_path / "TAD66K")
    with pytest.raises(ValueError, match="needs image_dir"):
        ds.build_datasets("tad66k", distribution=False, csv_dir=root)
    with pytest.raises(ValueError, match="'ava' variant needs vote distributions"):
        ds.build_datasets("tad66k", distribution=True, image_dir=root, csv_dir=root)
    with pytest.raises(ValueError, match="validation"):
        ds.build_datasets("tad66k", distribution=False, image_dir=root, csv_dir=root, validation="train")
    with pytest.raises(ValueError, match="dataset must be"):
        ds.build_datasets("flickr", distribution=False, image_dir=root)
    with pytest.raises(DataError,
                       match="holds neither merge/train.csv and merge/test.csv .* nor train.csv and test.csv"):
        ds.build_datasets("tad66k", distribution=False, image_dir=root, csv_dir=tmp_path / "empty")


@pytest.mark.slow
def test_build_tad66k_defaults_to_the_shipped_csvs(tmp_path):
    # no images needed to build the datasets; the carved split goes to split_dir, not into the repo
    sets = ds.build_datasets("tad66k", distribution=False, image_dir=tmp_path, validation="split",
                             split_dir=tmp_path / "splits")
    # the split every TAD66K run and trial uses: 10%, stratified by theme, seed 0, as it always was
    info = json.loads((tmp_path / "splits" / "split_info.json").read_text())
    assert info["val_sha256"] == "d088ea99946d2e373bb648ef1237d528f1732b80a30041f3462bf22ce0fe1d94"
    assert info["n_val"] == 5225 and info["stratified_by_theme"]
    assert (len(sets["train"]) + len(sets["val"]), len(sets["test"])) == (52248, 14079)
    assert len(sets["val"]) == round(0.1 * 52248)
    assert all(sets["test"].themes) and len(set(sets["test"].themes)) == 47
    assert os.path.dirname(sets["train"].paths[0]) == str(tmp_path)


# --------------------------------------------------------------------------- build_datasets: ava

def make_ava(root, with_train=True):
    rows = {"train": ["1,0,0,0,1,2,1,0,0,0,0,1,2,3", "2,1,1,1,1,1,1,1,1,1,1,0,0,5"],
            "val": ["3,0,0,0,0,0,0,0,0,1,1,0,0,5"],
            "test": ["4,5,0,0,0,0,0,0,0,0,0,0,0,5", "5,0,0,0,0,4,0,0,0,0,0,0,0,5"]}
    for split, r in rows.items():
        if split != "train" or with_train:
            write_csv(root / f"{split}.csv", AVA_HEADER + "\n".join(r) + "\n")
    write_images(root / "images", [f"{i}.jpg" for i in range(1, 6)])
    return root


def test_build_ava(tmp_path):
    root = make_ava(tmp_path / "AVA")
    sets = ds.build_datasets("ava", distribution=True, image_dir=root / "images", csv_dir=root)
    assert [len(sets[k]) for k in ("train", "val", "test")] == [2, 1, 2]
    item = sets["train"][0]
    assert item["target"].shape == (10,) and item["score"] == pytest.approx(5.0) and item["theme"] == ""
    assert sets["val"].names == ["3"]
    sets = ds.build_datasets("ava", distribution=False, image_dir=root / "images", csv_dir=root, validation="test")
    assert sets["val"].names == ["4", "5"] and sets["test"][1]["target"].item() == pytest.approx(0.5)


def test_build_ava_without_train_csv_explains_how_to_make_it(tmp_path):
    root = make_ava(tmp_path / "AVA", with_train=False)
    with pytest.raises(DataError, match="train.csv not found.*tools/make_ava_splits.py"):
        ds.build_datasets("ava", distribution=True, image_dir=root / "images", csv_dir=root)
    other = write_csv(tmp_path / "mytrain.csv", AVA_HEADER + "1,0,0,0,1,2,1,0,0,0,0,1,2,3\n")
    sets = ds.build_datasets("ava", distribution=True, image_dir=root / "images", csv_dir=root, train_csv=other)
    assert sets["train"].names == ["1"]
    with pytest.raises(ValueError, match="needs image_dir"):
        ds.build_datasets("ava", distribution=True, csv_dir=root)


# --------------------------------------------------------------------------- build_datasets: csv

def test_build_csv_own_data(tmp_path):
    img = tmp_path / "imgs"
    write_images(img, [f"p{i}.png" for i in range(10)])
    train = write_csv(tmp_path / "mine" / "tr.csv",
                      "image,score,theme\n" + "".join(f"p{i}.png,{i * 10},{'x' if i < 5 else 'y'}\n"
                                                      for i in range(8)))
    test = write_csv(tmp_path / "mine" / "te.csv", "image,score\np8.png,0\np9.png,100\n")
    sets = ds.build_datasets("csv", distribution=False, image_dir=img, train_csv=train, test_csv=test,
                             score_range=(0, 100), val_fraction=0.25)
    assert (len(sets["train"]), len(sets["val"])) == (6, 2)
    assert sorted(sets["val"].themes) == ["x", "y"]  # stratified by the theme column
    assert sets["test"].scores.tolist() == [1.0, 10.0] and sets["test"].themes == ["", ""]
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["te.csv", "tr.csv"]
    sets = ds.build_datasets("csv", distribution=False, image_dir=img, train_csv=train, test_csv=test,
                             val_csv=test, score_range=(0, 100))
    assert len(sets["train"]) == 8 and sets["val"].names == ["p8.png", "p9.png"]


def test_build_csv_requires_its_arguments(tmp_path):
    with pytest.raises(ValueError, match="needs train_csv and test_csv"):
        ds.build_datasets("csv", distribution=False, image_dir=tmp_path, train_csv=tmp_path / "a.csv")
    with pytest.raises(DataError, match="training CSV .*not found"):
        ds.build_datasets("csv", distribution=False, image_dir=tmp_path, train_csv=tmp_path / "a.csv",
                          test_csv=tmp_path / "b.csv")


# --------------------------------------------------------------------------- build_datasets: demo

def test_build_demo_generates_on_first_use(tmp_path):
    root = tmp_path / "demo"
    sets = ds.build_datasets("demo", distribution=False, csv_dir=root,
                             demo_options={"n_train": 12, "n_test": 4, "size": 48})
    assert (root / "manifest.json").is_file()
    assert (len(sets["train"]) + len(sets["val"]), len(sets["test"])) == (12, 4)
    assert len(sets["val"]) == 1
    item = sets["test"][0]
    assert item["image"].shape == (3, 224, 224) and item["theme"] in ("architecture", "flower", "mono", "vintage")
    assert 1.0 <= item["score"] <= 10.0
    assert check_images(sets["train"], mode="exists") is sets["train"]


def test_the_reference_csv_form_is_accepted(tmp_path, caplog):
    """--path_to_save_csv ./dataset/merge/ (train.csv and test.csv directly), per-theme metrics when the
    theme CSVs are beside it (../unmerge/), and a message naming both forms when neither is there."""
    made = make_tad66k(tmp_path / "dataset")  # dataset/merge/{train,test}.csv, dataset/unmerge/...
    sets = ds.build_datasets("tad66k", distribution=False, image_dir=made / "images", csv_dir=made / "merge")
    assert len(sets["test"]) == 4 and set(sets["test"].themes) == {"cat", "dog"}
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("train.csv", "test.csv"):
        (bare / name).write_bytes((made / "merge" / name).read_bytes())
    with caplog.at_level("WARNING", logger="dataset"):
        sets = ds.build_datasets("tad66k", distribution=False, image_dir=made / "images", csv_dir=bare)
    assert sets["test"].themes == [""] * 4 and "no per-theme CSVs" in caplog.text
    with pytest.raises(DataError, match=r"--path_to_save_csv.*neither merge/train.csv and merge/test.csv"):
        ds.build_datasets("tad66k", distribution=False, image_dir=made / "images", csv_dir=tmp_path / "nothing")
