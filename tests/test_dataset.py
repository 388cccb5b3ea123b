"""dataset.py: image loading, the reference transforms, CSV validation, datasets, missing images."""
from __future__ import annotations

import logging
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms

import dataset as ds
from imagedata import images
from dataset import DataError


def write_image(path, size=(20, 30), mode="RGB", fmt=None, seed=0, **save_kwargs):
    """A random image of size (w, h) written to path; returns path."""
    rng = np.random.default_rng(seed)
    w, h = size
    if mode == "RGB":
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")
    elif mode == "L":
        img = Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), "L")
    else:
        raise ValueError(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, fmt, **save_kwargs)
    return path


def write_csv(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# --------------------------------------------------------------------------- load_image

def test_load_rgb_jpeg_and_png(tmp_path):
    for name in ("a.jpg", "a.png"):
        img = images.load_image(write_image(tmp_path / name))
        assert img.mode == "RGB" and img.size == (20, 30)


def test_load_grayscale_is_replicated_to_rgb(tmp_path):
    img = images.load_image(write_image(tmp_path / "g.png", mode="L"))
    a = np.asarray(img)
    assert img.mode == "RGB" and (a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all()
    assert (a[..., 0] == np.asarray(Image.open(tmp_path / "g.png"))).all()


def test_load_la_composites_alpha_onto_white(tmp_path):
    la = np.zeros((30, 20, 2), dtype=np.uint8)
    la[..., 0] = 40
    la[:15, :, 1] = 255  # top half opaque, bottom half transparent
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    a = np.asarray(images.load_image(tmp_path / "la.png"))
    assert (a[:15] == 40).all() and (a[15:] == 255).all()


def test_load_rgba_composites_alpha_onto_white(tmp_path):
    rgba = np.zeros((30, 20, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = 128
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    px = np.asarray(images.load_image(tmp_path / "rgba.png"))[0, 0].astype(int)
    assert abs(px[0] - 228) <= 1 and abs(px[1] - 127) <= 1 and abs(px[2] - 127) <= 1


def test_load_palette_png_with_transparency(tmp_path):
    p = Image.new("P", (20, 30), 0)
    p.putpalette([0, 0, 0, 0, 200, 0] + [0] * 762)
    p.paste(1, (0, 0, 20, 15))  # top half green, bottom half index 0 = transparent
    p.save(tmp_path / "p.png", transparency=0)
    assert Image.open(tmp_path / "p.png").mode == "P"
    a = np.asarray(images.load_image(tmp_path / "p.png"))
    assert (a[:15] == (0, 200, 0)).all() and (a[15:] == 255).all()


def test_load_palette_png_without_transparency(tmp_path):
    p = Image.new("P", (20, 30), 1)
    p.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    p.save(tmp_path / "p.png")
    assert (np.asarray(images.load_image(tmp_path / "p.png")) == (10, 20, 30)).all()


def test_load_cmyk_jpeg(tmp_path):
    Image.new("CMYK", (20, 30), (0, 255, 255, 0)).save(tmp_path / "c.jpg", quality=95)
    assert Image.open(tmp_path / "c.jpg").mode == "CMYK"
    img = images.load_image(tmp_path / "c.jpg")
    r, g, b = np.asarray(img).reshape(-1, 3).mean(axis=0)
    assert img.mode == "RGB" and r > 240 and g < 15 and b < 15


def test_load_16bit_png_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 25700, 32896, 65535]], dtype=np.uint16).repeat(3, axis=0)
    Image.fromarray(values).save(tmp_path / "i16.png")
    assert Image.open(tmp_path / "i16.png").mode.startswith("I;16")
    a = np.asarray(images.load_image(tmp_path / "i16.png"))
    assert a.dtype == np.uint8 and (a[0, :, 0] == [0, 100, 128, 255]).all()


def test_load_32bit_int_and_float_tiffs(tmp_path):
    Image.fromarray(np.array([[0, 25700, 65535]], dtype=np.int32), "I").save(tmp_path / "i.tif")
    Image.fromarray(np.array([[0, 100, 255]], dtype=np.int32), "I").save(tmp_path / "i8.tif")
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), "F").save(tmp_path / "f.tif")
    assert Image.open(tmp_path / "i.tif").mode == "I" and Image.open(tmp_path / "f.tif").mode == "F"
    assert (np.asarray(images.load_image(tmp_path / "i.tif"))[0, :, 0] == [0, 100, 255]).all()
    assert (np.asarray(images.load_image(tmp_path / "i8.tif"))[0, :, 0] == [0, 100, 255]).all()
    assert (np.asarray(images.load_image(tmp_path / "f.tif"))[0, :, 0] == [0, 128, 255]).all()


def test_load_bilevel_png(tmp_path):
    Image.new("1", (20, 30), 1).save(tmp_path / "b.png")
    assert (np.asarray(images.load_image(tmp_path / "b.png")) == 255).all()


def test_load_applies_exif_orientation(tmp_path):
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 20, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    img.save(tmp_path / "rot.jpg", exif=exif.tobytes())
    assert Image.open(tmp_path / "rot.jpg").size == (20, 30)
    assert images.load_image(tmp_path / "rot.jpg").size == (30, 20)


def test_truncated_jpeg_is_refused(tmp_path):
    data = write_image(tmp_path / "full.jpg", size=(64, 64)).read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="cut.jpg"):
        images.load_image(tmp_path / "cut.jpg")
    assert not getattr(__import__("PIL.ImageFile").ImageFile, "LOAD_TRUNCATED_IMAGES")


@pytest.mark.parametrize("max_pixels", [100, 400])  # 600 px: > 2x the limit (error), > the limit (warning)
def test_decompression_bomb_is_refused(tmp_path, monkeypatch, max_pixels):
    path = write_image(tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", max_pixels)
    with pytest.raises(DataError, match=r"bomb\.png.*decompression bomb"):
        images.load_image(path)


@pytest.mark.parametrize("content", [b"", b"this is not an image\n", b"\xff\xd8\xff\xe0garbage",
                                     b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 20 30\n"])
def test_non_images_are_refused_naming_the_file(tmp_path, content):
    path = tmp_path / "bad.jpg"
    path.write_bytes(content)
    with pytest.raises(DataError, match="bad.jpg"):
        images.load_image(path)


def test_missing_file_and_folder_are_refused(tmp_path):
    with pytest.raises(DataError, match="nope.jpg.*not found"):
        images.load_image(tmp_path / "nope.jpg")
    with pytest.raises(DataError, match="not a file"):
        images.load_image(tmp_path)


def _odd_images(folder):
    """Files of the modes load_image converts: (name, path)."""
    la = np.zeros((30, 20, 2), dtype=np.uint8)
    la[:15, :, 1] = 255
    Image.fromarray(la, "LA").save(folder / "la.png")
    Image.new("CMYK", (20, 30), (0, 255, 255, 0)).save(folder / "c.jpg", quality=95)
    Image.fromarray(np.array([[0, 25700, 65535]], dtype=np.uint16)).save(folder / "i16.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 20, 3), dtype=np.uint8)).save(
        folder / "rot.jpg", exif=exif.tobytes())
    return [write_image(folder / "a.jpg"), write_image(folder / "g.png", mode="L"), folder / "la.png",
            folder / "c.jpg", folder / "i16.png", folder / "rot.jpg"]


def test_decode_image_gives_load_images_pixels(tmp_path):
    for path in _odd_images(tmp_path):
        from_file = ds.load_image(path)
        from_bytes = images.decode_image(path.read_bytes(), "upload")
        assert from_bytes.mode == "RGB" and from_bytes.size == from_file.size, path.name
        assert (np.asarray(from_bytes) == np.asarray(from_file)).all(), path.name


@pytest.mark.parametrize("content", [b"this is not an image\n", b"\xff\xd8\xff\xe0garbage",
                                     b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 20 30\n"])
def test_decode_image_refuses_non_images_naming_the_label(content):
    with pytest.raises(DataError, match="image file my photo.jpg (is not a readable image|could not be decoded)"):
        images.decode_image(content, "my photo.jpg")


def test_decode_image_refuses_empty_truncated_and_bomb(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="image file e.jpg is empty"):
        images.decode_image(b"", "e.jpg")
    data = write_image(tmp_path / "full.jpg", size=(64, 64)).read_bytes()
    with pytest.raises(DataError, match="image file cut.jpg could not be decoded"):
        images.decode_image(data[: len(data) // 2], "cut.jpg")
    png = write_image(tmp_path / "bomb.png").read_bytes()
    for max_pixels in (100, 400):
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", max_pixels)
        with pytest.raises(DataError, match="image file bomb.png refused as a possible decompression bomb"):
            images.decode_image(png, "bomb.png")


# --------------------------------------------------------------------------- transforms

def _reference(style, train):
    """The reference pipelines, written out as in the reference code."""
    norm = [transforms.ToTensor(), transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])]
    if style == "tad66k":
        if train:
            return transforms.Compose([transforms.Resize((256, 256)), transforms.RandomHorizontalFlip(),
                                       transforms.RandomCrop(224), *norm])
        return transforms.Compose([transforms.Resize((224, 224)), *norm])
    resize = transforms.Lambda(lambda im: im.resize((224, 224)))
    return transforms.Compose([resize, transforms.RandomHorizontalFlip(), *norm] if train else [resize, *norm])


@pytest.mark.parametrize("style", ["tad66k", "ava"])
@pytest.mark.parametrize("train", [True, False])
def test_transforms_equal_the_reference_pipeline(tmp_path, style, train):
    img = images.load_image(write_image(tmp_path / "x.jpg", size=(37, 23)))
    ours, ref = ds.build_transform(style, train), _reference(style, train)
    outputs = set()
    for seed in range(6):
        torch.manual_seed(seed)
        a = ours(img)
        torch.manual_seed(seed)
        b = ref(img)
        assert a.shape == (3, 224, 224) and a.dtype == torch.float32
        assert torch.equal(a, b)
        outputs.add(a.sum().item())
    assert (len(outputs) > 1) == train  # training transforms are random, evaluation ones are not


def test_ava_resize_uses_pillows_default_filter(tmp_path):
    img = images.load_image(write_image(tmp_path / "x.png", size=(50, 40)))
    assert images.Resize((224, 224))(img).tobytes() == img.resize((224, 224)).tobytes()
    assert images.Resize((224, 224))(img).tobytes() != img.resize((224, 224), Image.Resampling.NEAREST).tobytes()


def test_transforms_pickle_for_dataloader_workers():
    for style in ("tad66k", "ava"):
        for train in (True, False):
            pickle.loads(pickle.dumps(ds.build_transform(style, train)))


def test_build_transform_rejects_unknown_style():
    with pytest.raises(ValueError, match="style"):
        ds.build_transform("nima", True)


# --------------------------------------------------------------------------- read_score_csv

def test_read_score_csv_valid(tmp_path):
    p = write_csv(tmp_path / "s.csv", "image,score,theme\na.jpg,2.85,cat\nb.jpg,10,dog\n\n")
    df = ds.read_score_csv(p)
    assert df["image"].tolist() == ["a.jpg", "b.jpg"]
    assert df["score"].tolist() == [2.85, 10.0] and df["score"].dtype == np.float64
    assert df["theme"].tolist() == ["cat", "dog"]


def test_read_score_csv_handles_bom_and_custom_range(tmp_path):
    p = tmp_path / "s.csv"
    p.write_bytes("\ufeffimage,score\na.jpg,55\n".encode("utf-8"))
    assert ds.read_score_csv(p, score_range=(0, 100))["score"].tolist() == [55.0]


@pytest.mark.parametrize("text, match", [
    ("image,rating\na.jpg,5\n", r"missing column\(s\) score"),
    ("name,score\na.jpg,5\n", r"missing column\(s\) image"),
    ("image,score\n", "no data rows"),
    ("", "is empty"),
    ("image,score\na.jpg,5\nb.jpg,nan\n", r"row 2 \('b.jpg'\): score is NaN"),
    ("image,score\na.jpg,5\nb.jpg,\n", r"row 2 \('b.jpg'\).*is empty"),
    ("image,score\na.jpg,good\n", r"row 1 \('a.jpg'\).*not a number \('good'\)"),
    ("image,score\na.jpg,5\nb.jpg,11\n", r"row 2 \('b.jpg'\): score 11 is outside the score range 1..10"),
    ("image,score\na.jpg,0.5\n", "row 1.*outside"),
    ("image,score\na.jpg,inf\n", "row 1.*outside"),
    ("image,score\na.jpg,5\nb.jpg,6\na.jpg,7\n", r"'a.jpg' appears more than once \(rows 1, 3\)"),
    ("image,score\na.jpg,5\n,6\n", "row 2 has an empty image"),
    ("image,score\n\"a\tb.jpg\",5\n", "row 1 has a image with control characters"),
    ("image,score\na.jpg,5,extra,fields\n", "not a valid CSV: some rows have more fields"),
    ("image,score\na.jpg,5\nb.jpg,5,6\n", "not a valid CSV.*line 3"),
    ("image,score\na.jpg\n", r"row 1 \('a.jpg'\): score is empty"),
])
def test_read_score_csv_rejects_bad_data(tmp_path, text, match):
    p = write_csv(tmp_path / "bad.csv", text)
    with pytest.raises(DataError, match=match) as info:
        ds.read_score_csv(p)
    assert "bad.csv" in str(info.value)


def test_read_score_csv_non_utf8_names_the_line(tmp_path):
    p = tmp_path / "latin.csv"
    p.write_bytes(b"image,score\na.jpg,5\ncaf\xe9.jpg,6\n")
    with pytest.raises(DataError, match=r"latin.csv: line 3 is not valid UTF-8"):
        ds.read_score_csv(p)


def test_read_score_csv_missing_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        ds.read_score_csv(tmp_path / "none.csv")


def test_score_range_must_be_ordered(tmp_path):
    p = write_csv(tmp_path / "s.csv", "image,score\na.jpg,5\n")
    with pytest.raises(ValueError, match="low < high"):
        ds.read_score_csv(p, score_range=(10, 1))


# --------------------------------------------------------------------------- read_ava_csv

AVA_HEADER = "image_id,score2,score3,score4,score5,score6,score7,score8,score9,score10,score11,tag1,tag2,tag3\n"


def test_read_ava_csv_valid(tmp_path):
    p = write_csv(tmp_path / "ava.csv", AVA_HEADER + "12,0,1,2,3,4,5,0,0,0,1,15,0,738\n007,1,0,0,0,0,0,0,0,0,0,0,0,1\n"
                  "0,1,0,0,0,0,0,0,0,0,0,0,0,1\n")
    df = ds.read_ava_csv(p)
    assert df["image_id"].tolist() == ["12", "7", "0"]  # read as integers, like the reference
    assert df.loc[0, list(ds.AVA_VOTE_COLUMNS)].tolist() == [0, 1, 2, 3, 4, 5, 0, 0, 0, 1]
    assert df["tag3"].tolist() == [738, 1, 1] and df["score2"].dtype == np.int64


@pytest.mark.parametrize("row, match", [
    ("12,0,1,-2,3,4,5,0,0,0,1,15,0,738", r"row 1 \('12'\): vote count score4 = '-2' is negative"),
    ("12,0,1,,3,4,5,0,0,0,1,15,0,738", r"row 1 \('12'\): vote count score4 is empty"),
    ("12,0,1,nan,3,4,5,0,0,0,1,15,0,738", "score4 is NaN"),
    ("12,0,1,2.5,3,4,5,0,0,0,1,15,0,738", "score4 = '2.5' is not a whole number"),
    ("12,0,1,x,3,4,5,0,0,0,1,15,0,738", r"not a number \('x'\)"),
    ("12,0,0,0,0,0,0,0,0,0,0,15,0,738", r"row 1 \('12'\) has no votes at all"),
    ("12,0,1,2,3,4,5,0,0,0,1,a,0,738", "tag tag1"),
])
def test_read_ava_csv_rejects_bad_rows(tmp_path, row, match):
    p = write_csv(tmp_path / "ava.csv", AVA_HEADER + row + "\n")
    with pytest.raises(DataError, match=match) as info:
        ds.read_ava_csv(p)
    assert "ava.csv" in str(info.value)


def test_read_ava_csv_rejects_missing_columns_duplicates_and_empty(tmp_path):
    p = write_csv(tmp_path / "a.csv", "image_id,score2,score3\n1,2,3\n")
    with pytest.raises(DataError, match=r"missing column\(s\) score4.*tag3"):
        ds.read_ava_csv(p)
    row = "5,0,1,2,3,4,5,0,0,0,1,15,0,738\n"
    with pytest.raises(DataError, match=r"'5' appears more than once \(rows 1, 2\)"):
        ds.read_ava_csv(write_csv(tmp_path / "b.csv", AVA_HEADER + row + "0" + row))
    with pytest.raises(DataError, match="no data rows"):
        ds.read_ava_csv(write_csv(tmp_path / "c.csv", AVA_HEADER))


def test_shipped_csvs_are_valid():
    assert len(ds.read_ava_csv(ds.DEFAULT_AVA_DIR / "test.csv")) == 12776
    assert len(ds.read_ava_csv(ds.DEFAULT_AVA_DIR / "val.csv")) == 12775
    assert len(ds.read_score_csv(ds.DEFAULT_TAD66K_DIR / "merge" / "test.csv")) == 14079


# --------------------------------------------------------------------------- themes

def test_read_theme_csvs_merges_folders(tmp_path):
    write_csv(tmp_path / "tr" / "cat.csv", "image,score\na.jpg,5\nb.jpg,6\n")
    write_csv(tmp_path / "tr" / "dog.csv", "image,score\nc.jpg,5\n")
    write_csv(tmp_path / "te" / "cat.csv", "image,score\nd.jpg,5\na.jpg,5\n")
    assert ds.read_theme_csvs(tmp_path / "tr", tmp_path / "te") == {
        "a.jpg": "cat", "b.jpg": "cat", "c.jpg": "dog", "d.jpg": "cat"}


def test_read_theme_csvs_refuses_an_image_in_two_themes(tmp_path):
    write_csv(tmp_path / "cat.csv", "image,score\na.jpg,5\n")
    write_csv(tmp_path / "dog.csv", "image,score\na.jpg,5\n")
    with pytest.raises(DataError, match=r"'a.jpg' is in two themes: 'cat' .*cat.csv.* and 'dog' .*dog.csv"):
        ds.read_theme_csvs(tmp_path)


def test_read_theme_csvs_refuses_empty_or_missing_folder(tmp_path):
    with pytest.raises(DataError, match="no <theme>.csv"):
        ds.read_theme_csvs(tmp_path)
    with pytest.raises(DataError, match="not found"):
        ds.read_theme_csvs(tmp_path / "nope")


# --------------------------------------------------------------------------- image paths

@pytest.mark.parametrize("name", ["../x.jpg", "a/../../x.jpg", "/etc/passwd", "./../x.jpg"])
def test_names_leaving_the_image_folder_are_refused(tmp_path, name):
    with pytest.raises(DataError, match="outside the image folder|absolute path"):
        ds.resolve_image_path(tmp_path, name)
    assert ds.resolve_image_path(tmp_path, name, allow_outside=True) == tmp_path / name


@pytest.mark.parametrize("name", ["a.jpg", "sub/a.jpg", "sub/../a.jpg", "..a.jpg", "a..jpg"])
def test_names_inside_the_image_folder_are_accepted(tmp_path, name):
    assert ds.resolve_image_path(tmp_path, name) == tmp_path / name


def test_odd_names_give_clear_errors(tmp_path):
    with pytest.raises(DataError, match="invalid image name"):
        ds.resolve_image_path(tmp_path, "a\x00.jpg")
    with pytest.raises(DataError, match="not valid Unicode"):
        ds.resolve_image_path(tmp_path, "caf\udce9.jpg")


# --------------------------------------------------------------------------- ScoreImageDataset

def make_score_data(tmp_path, rows, header="image,score", n_images=None):
    img_dir = tmp_path / "images"
    for i, row in enumerate(rows[:n_images] if n_images is not None else rows):
        write_image(img_dir / row.split(",")[0], seed=i)
    return write_csv(tmp_path / "data.csv", header + "\n" + "\n".join(rows) + "\n"), img_dir


def test_score_dataset_items(tmp_path):
    csv, img_dir = make_score_data(tmp_path, ["a.jpg,2.85", "b.png,10", "sub/c.jpg,1"])
    d = ds.ScoreImageDataset(csv, img_dir, train=True, themes={"a.jpg": "cat", "b.png": "dog"})
    assert len(d) == 3
    item = d[0]
    assert set(item) == {"image", "target", "score", "theme", "index", "path"}
    assert item["image"].shape == (3, 224, 224) and item["image"].dtype == torch.float32
    assert item["target"].shape == (1,) and item["target"].dtype == torch.float32
    assert item["target"].item() == pytest.approx(0.285) and item["score"] == pytest.approx(2.85)
    assert item["theme"] == "cat" and item["index"] == 0 and item["path"] == str(img_dir / "a.jpg")
    assert d[2]["theme"] == "" and d[2]["path"] == str(img_dir / "sub" / "c.jpg")


def test_score_dataset_theme_column_wins_and_default_is_blank(tmp_path):
    csv, img_dir = make_score_data(tmp_path, ["a.jpg,5,cat", "b.jpg,6,dog"], header="image,score,theme")
    d = ds.ScoreImageDataset(csv, img_dir, train=False, themes={"a.jpg": "other"})
    assert d.themes == ["cat", "dog"] and d[1]["theme"] == "dog"
    csv2 = write_csv(tmp_path / "plain.csv", "image,score\na.jpg,5\n")
    assert ds.ScoreImageDataset(csv2, img_dir, train=False)[0]["theme"] == ""


def test_score_dataset_maps_score_range_to_1_10(tmp_path):
    csv, img_dir = make_score_data(tmp_path, ["a.jpg,0", "b.jpg,50", "c.jpg,100"])
    d = ds.ScoreImageDataset(csv, img_dir, train=False, score_range=(0, 100))
    assert d.scores.tolist() == [1.0, 5.5, 10.0]
    assert d[1]["target"].item() == pytest.approx(0.55)
    with pytest.raises(DataError, match="outside the score range 1..10"):
        ds.ScoreImageDataset(csv, img_dir, train=False)


def test_score_dataset_eval_is_deterministic_and_train_is_not(tmp_path):
    csv, img_dir = make_score_data(tmp_path, ["a.jpg,5"])
    ev = ds.ScoreImageDataset(csv, img_dir, train=False)
    assert torch.equal(ev[0]["image"], ev[0]["image"])
    tr = ds.ScoreImageDataset(csv, img_dir, train=True)
    torch.manual_seed(0)
    assert len({tr[0]["image"].sum().item() for _ in range(8)}) > 1


def test_score_dataset_refuses_path_traversal(tmp_path):
    write_image(tmp_path / "secret.jpg")
    csv, img_dir = make_score_data(tmp_path, ["a.jpg,5", "../secret.jpg,6"], n_images=1)
    with pytest.raises(DataError, match=r"data.csv: row 2: image name '../secret.jpg' points outside"):
        ds.ScoreImageDataset(csv, img_dir, train=False)
    d = ds.ScoreImageDataset(csv, img_dir, train=False, allow_outside=True)
    assert d[1]["image"].shape == (3, 224, 224)


def test_undecodable_image_raises_naming_the_file(tmp_path):
    csv, img_dir = make_score_data(tmp_path, ["a.jpg,5", "b.jpg,6"])
    (img_dir / "b.jpg").write_bytes(b"garbage")
    d = ds.ScoreImageDataset(csv, img_dir, train=False)
    with pytest.raises(DataError, match="b.jpg"):
        d[1]


def test_skip_bad_returns_none_logs_and_collate_drops_it(tmp_path, caplog):
    csv, img_dir = make_score_data(tmp_path, ["a.jpg,5", "b.jpg,6", "c.jpg,7"])
    (img_dir / "b.jpg").write_bytes(b"garbage")
    d = ds.ScoreImageDataset(csv, img_dir, train=False, skip_bad=True)
    with caplog.at_level(logging.WARNING, logger="dataset"):
        assert d[1] is None
    assert "b.jpg" in caplog.text
    batches = list(DataLoader(d, batch_size=3, collate_fn=ds.collate_skip_none))
    assert len(batches) == 1
    batch = batches[0]
    assert batch["image"].shape == (2, 3, 224, 224) and batch["target"].shape == (2, 1)
    assert batch["index"].tolist() == [0, 2] and batch["theme"] == ["", ""]
    assert batch["score"].tolist() == [5.0, 7.0]


def test_collate_skip_none_all_bad_is_none():
    assert ds.collate_skip_none([None, None]) is None


def test_dataset_pickles_for_workers(tmp_path):
    csv, img_dir = make_score_data(tmp_path, ["a.jpg,5"])
    d = pickle.loads(pickle.dumps(ds.ScoreImageDataset(csv, img_dir, train=True)))
    assert d[0]["image"].shape == (3, 224, 224)


# --------------------------------------------------------------------------- AVADataset

def make_ava_data(tmp_path, rows, n_images=None):
    img_dir = tmp_path / "ava_images"
    for i, row in enumerate(rows[:n_images] if n_images is not None else rows):
        write_image(img_dir / f"{row.split(',')[0]}.jpg", seed=i)
    return write_csv(tmp_path / "ava.csv", AVA_HEADER + "\n".join(rows) + "\n"), img_dir


def test_ava_dataset_distribution_target(tmp_path):
    csv, img_dir = make_ava_data(tmp_path, ["10,0,0,0,0,1,3,0,0,0,0,1,2,3", "11,1,0,0,0,0,0,0,0,0,1,0,0,0"])
    d = ds.AVADataset(csv, img_dir, train=True)
    item = d[0]
    assert item["image"].shape == (3, 224, 224)
    assert item["target"].shape == (10,) and item["target"].dtype == torch.float32
    assert torch.allclose(item["target"], torch.tensor([0, 0, 0, 0, 0.25, 0.75, 0, 0, 0, 0]))
    assert item["score"] == pytest.approx(5.75) and item["theme"] == ""
    assert item["path"] == str(img_dir / "10.jpg")
    assert d[1]["score"] == pytest.approx(5.5)


def test_ava_dataset_tad66k_variant_target_is_mean_over_10(tmp_path):
    csv, img_dir = make_ava_data(tmp_path, ["10,0,0,0,0,1,3,0,0,0,0,1,2,3"])
    item = ds.AVADataset(csv, img_dir, train=False, distribution=False)[0]
    assert item["target"].shape == (1,) and item["target"].item() == pytest.approx(0.575)


def test_ava_dataset_skip_bad(tmp_path):
    csv, img_dir = make_ava_data(tmp_path, ["10,0,0,0,0,1,3,0,0,0,0,1,2,3"])
    (img_dir / "10.jpg").write_bytes(b"")
    assert ds.AVADataset(csv, img_dir, train=False, skip_bad=True)[0] is None
    with pytest.raises(DataError, match="10.jpg.*empty"):
        ds.AVADataset(csv, img_dir, train=False)[0]


def test_to_rgb_converts_in_memory_images_and_refuses_unconvertible_modes():
    rgba = Image.new("RGBA", (2, 2), (10, 20, 30, 0))
    assert images.to_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)
    rgb = Image.new("RGB", (2, 2), (1, 2, 3))
    assert images.to_rgb(rgb) is rgb
    with pytest.raises(ValueError):
        images.to_rgb(Image.new("La", (2, 2)))
