"""imagedata.image_check.check_images: missing files, undecodable images before the first epoch, the cache of
results per file version, the skip options and what their messages say."""
from __future__ import annotations

import logging
import os

import numpy as np
import pytest
from PIL import Image

import dataset as ds
from imagedata import image_check
from dataset import DataError
from imagedata.image_check import check_images


def write_image(path, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (30, 20, 3), dtype=np.uint8), "RGB").save(path)
    return path


def make_data(tmp_path, names, n_images=None, header="image,score"):
    img_dir = tmp_path / "images"
    for i, name in enumerate(names[:n_images] if n_images is not None else names):
        write_image(img_dir / name, seed=i)
    csv = tmp_path / "data.csv"
    csv.write_text(header + "\n" + "".join(f"{n},5\n" for n in names), encoding="utf-8")
    return csv, img_dir


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.fixture
def decodes(monkeypatch):
    """Every path image_check decodes (in this process)."""
    seen = []
    real = image_check._decode
    monkeypatch.setattr(image_check, "_decode", lambda p: (seen.append(os.path.basename(p)), real(p))[1])
    return seen


# --------------------------------------------------------------------------- missing files

def test_all_present_passes(tmp_path):
    csv, img_dir = make_data(tmp_path, ["a.jpg", "b.jpg"])
    d = ds.ScoreImageDataset(csv, img_dir, train=False)
    assert check_images(d, mode="exists") is d and check_images(d) is d and len(d) == 2


def test_missing_images_raise_with_count_names_rows_and_hint(tmp_path):
    csv, img_dir = make_data(tmp_path, [f"{c}.jpg" for c in "abcdefgh"], n_images=1)
    d = ds.ScoreImageDataset(csv, img_dir, train=False)
    with pytest.raises(DataError, match=r"7 of 8 images .*missing.*'b.jpg' \(row 2\); 'c.jpg' \(row 3\).*\.\.\..*"
                                        r"--skip_missing"):
        check_images(d, mode="exists")


def test_skip_missing_drops_them_and_lists_them(tmp_path, caplog):
    csv, img_dir = make_data(tmp_path, ["a.jpg", "b.jpg", "c.jpg"])
    (img_dir / "b.jpg").unlink()
    d = ds.ScoreImageDataset(csv, img_dir, train=False, themes={"c.jpg": "cat"})
    with caplog.at_level(logging.WARNING, logger="imagedata.image_check"):
        out = check_images(d, mode="exists", skip_missing=True, log_dir=tmp_path / "run", split="val")
    assert "1 of 3 images" in caplog.text
    assert out.names == ["a.jpg", "c.jpg"] and out.themes == ["", "cat"] and out.rows == [1, 3]
    assert out.scores.tolist() == [5.0, 5.0] and out.targets.shape == (2, 1)
    assert (tmp_path / "run" / "missing_images_val.txt").read_text() == "b.jpg\n"
    assert out[1]["theme"] == "cat" and out[1]["index"] == 1


def test_nothing_left_is_an_error(tmp_path):
    csv, img_dir = make_data(tmp_path, ["a.jpg"], n_images=0)
    with pytest.raises(DataError, match="all of them"):
        check_images(ds.ScoreImageDataset(csv, img_dir, train=False), mode="exists", skip_missing=True)


def test_ava_names(tmp_path):
    header = "image_id," + ",".join(f"score{i}" for i in range(2, 12)) + ",tag1,tag2,tag3"
    img_dir = tmp_path / "ava"
    write_image(img_dir / "10.jpg")
    csv = tmp_path / "ava.csv"
    csv.write_text(header + "\n10,0,0,0,0,1,3,0,0,0,0,1,2,3\n11,1,0,0,0,0,0,0,0,0,1,0,0,0\n")
    d = ds.AVADataset(csv, img_dir, train=False)
    with pytest.raises(DataError, match="'11' \\(row 2\\)"):
        check_images(d)
    assert check_images(d, skip_missing=True).names == ["10"] and d.targets.shape == (1, 10)


# --------------------------------------------------------------------------- decoding

def test_undecodable_image_stops_with_its_row_and_the_options(tmp_path):
    csv, img_dir = make_data(tmp_path, ["a.jpg", "b.jpg", "c.jpg"])
    truncate(img_dir / "b.jpg")
    d = ds.ScoreImageDataset(csv, img_dir, train=False)
    assert check_images(d, mode="exists") is d  # existence alone does not see it
    with pytest.raises(DataError) as info:
        check_images(d, cache=None)
    message = str(info.value)
    assert "1 of 3 images" in message and "'b.jpg' (row 2)" in message and str(csv) in message
    assert "--skip_bad" in message and "--check_images exists" in message


def test_skip_bad_drops_and_lists_them(tmp_path):
    csv, img_dir = make_data(tmp_path, ["a.jpg", "b.jpg", "c.jpg"])
    (img_dir / "c.jpg").write_bytes(b"not an image")
    d = ds.ScoreImageDataset(csv, img_dir, train=True)
    check_images(d, skip_bad=True, log_dir=tmp_path / "run", cache=None)
    assert d.names == ["a.jpg", "b.jpg"] and d.rows == [1, 2]
    listed = (tmp_path / "run" / "bad_images_train.txt").read_text()
    assert listed.startswith("c.jpg\t") and "not a readable image" in listed


def test_results_are_remembered_per_file_version(tmp_path, decodes):
    csv, img_dir = make_data(tmp_path, ["a.jpg", "b.jpg"])
    cache = tmp_path / "checks.sqlite"
    d = ds.ScoreImageDataset(csv, img_dir, train=False)
    check_images(d, cache=cache)
    assert sorted(decodes) == ["a.jpg", "b.jpg"]
    check_images(d, cache=cache)
    assert len(decodes) == 2  # a second check decodes nothing
    truncate(img_dir / "b.jpg")  # a new size and modification time: decoded again, and now refused
    with pytest.raises(DataError, match="'b.jpg'"):
        check_images(d, cache=cache)
    assert decodes[2:] == ["b.jpg"]
    with pytest.raises(DataError, match="'b.jpg'"):  # the failure is remembered too
        check_images(d, cache=cache)
    assert len(decodes) == 3


def test_an_unusable_cache_only_costs_time(tmp_path, decodes, caplog):
    csv, img_dir = make_data(tmp_path, ["a.jpg"])
    bad = tmp_path / "checks.sqlite"
    bad.write_bytes(b"this is not a database" * 100)
    with caplog.at_level(logging.WARNING, logger="imagedata.image_check"):
        check_images(ds.ScoreImageDataset(csv, img_dir, train=False), cache=bad)
    assert decodes == ["a.jpg"] and "cache" in caplog.text


@pytest.mark.slow
def test_many_images_are_decoded_by_worker_processes(tmp_path):
    names = [f"i{k:03d}.png" for k in range(image_check.IN_PROCESS_BELOW + 6)]
    csv, img_dir = make_data(tmp_path, names)
    truncate(img_dir / names[-1])
    d = ds.ScoreImageDataset(csv, img_dir, train=False)
    with pytest.raises(DataError, match=f"'{names[-1]}' \\(row {len(names)}\\)"):
        check_images(d, workers=2, cache=tmp_path / "c.sqlite")
    check_images(d, workers=2, skip_bad=True, cache=tmp_path / "c.sqlite")
    assert len(d) == len(names) - 1


def test_mode_none_checks_nothing_and_bad_modes_are_refused(tmp_path):
    csv, img_dir = make_data(tmp_path, ["a.jpg"], n_images=0)
    d = ds.ScoreImageDataset(csv, img_dir, train=False)
    assert check_images(d, mode="none") is d
    with pytest.raises(ValueError, match="--check_images"):
        check_images(d, mode="all")


def test_default_cache_location(monkeypatch, tmp_path):
    monkeypatch.setenv("TANET_CACHE_DIR", str(tmp_path / "c"))
    assert image_check.default_cache_path() == tmp_path / "c" / "image_checks.sqlite"
    monkeypatch.delenv("TANET_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert image_check.default_cache_path() == tmp_path / "x" / "tanet" / "image_checks.sqlite"
