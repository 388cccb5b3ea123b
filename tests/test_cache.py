"""The prepared-dataset cache: items equal the uncached ones, staleness, interrupted builds, the CLI."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms
from torchvision.transforms import functional as F

from imagedata.augment import AugmentParams, augment_batch, normalise, sample_augment_params
from imagedata.cache import PIXELS_FILE, CacheError, CachedDataset, StaleCacheError, build_cache, cache_spec
from dataset import (
    AVA_COLUMNS,
    AVADataset,
    DataError,
    ScoreImageDataset,
    collate_skip_none,
    load_image,
)
from training.engine import infer, make_loader, train_one_epoch
from helpers.preprocessing import IMAGENET_MEAN, IMAGENET_STD

REPO = Path(__file__).resolve().parents[1]
SIZES = [(300, 200), (200, 300), (257, 257), (640, 427), (224, 224), (100, 80), (333, 251)]


def _write_images(folder: Path, n: int, seed: int = 0) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = []
    for i in range(n):
        w, h = SIZES[i % len(SIZES)]
        base = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
        img = Image.fromarray(base).resize((w, h), Image.Resampling.BILINEAR)
        name = f"img_{i:02d}.jpg"
        img.save(folder / name, quality=90)
        names.append(name)
    return names


@pytest.fixture
def data(tmp_path):
    """A folder of 9 JPEGs of assorted sizes, a TAD66K-format CSV and an AVA CSV over them."""
    names = _write_images(tmp_path / "images", 9)
    rows = "".join(f"{n},{1 + i * 0.5:.2f},{'ab'[i % 2]}\n" for i, n in enumerate(names))
    (tmp_path / "scores.csv").write_text("image,score,theme\n" + rows, encoding="utf-8")
    for i, n in enumerate(names):  # AVA names its files <image_id>.jpg
        os.link(tmp_path / "images" / n, tmp_path / "images" / f"{i + 1}.jpg")
    ava = "".join(f"{i + 1}," + ",".join(str((i + k) % 4) for k in range(10)) + ",0,0,0\n" for i in range(len(names)))
    (tmp_path / "ava.csv").write_text(",".join(AVA_COLUMNS) + "\n" + ava, encoding="utf-8")
    return tmp_path


def _tad(data: Path, train: bool, **kw) -> ScoreImageDataset:
    return ScoreImageDataset(data / "scores.csv", data / "images", train=train, **kw)


def _ava(data: Path, train: bool) -> AVADataset:
    return AVADataset(data / "ava.csv", data / "images", train=train)


def _built(ds, folder: Path, **kw) -> CachedDataset:
    build_cache(ds, folder, chunk_size=4, workers=0, progress=False, **kw)
    return CachedDataset(ds, folder)


def _same_labels(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) if k == "target" else a[k] == b[k] for k in a if k != "image")


# --------------------------------------------------------------------------- equality with the uncached items

@pytest.mark.parametrize("make", [_tad, _ava], ids=["tad66k", "ava"])
def test_eval_items_equal_uncached_exactly(data, tmp_path, make):
    ds = make(data, train=False)
    cached = _built(ds, tmp_path / "cache")
    assert len(cached) == len(ds)
    for i in range(len(ds)):
        ref, item = ds[i], cached[i]
        assert item["image"].dtype == torch.uint8 and item["image"].shape == (3, 224, 224)
        assert _same_labels(ref, item)
        assert set(ref) == set(item)
        assert torch.equal(augment_batch(item["image"][None], train=False)[0], ref["image"])


def test_normalise_is_totensor_normalize(data):
    img = load_image(data / "images" / "img_03.jpg")
    ref = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)(transforms.ToTensor()(img))
    u8 = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)
    assert torch.equal(normalise(u8[None])[0], ref)


@pytest.mark.parametrize("params", [(False, 0, 0), (True, 0, 0), (False, 32, 32), (True, 5, 17), (True, 31, 0)])
def test_train_crop_flip_equals_reference_for_the_same_parameters(data, tmp_path, params):
    ds = _tad(data, train=True)
    cached = _built(ds, tmp_path / "cache")
    flip, top, left = params
    for i in (0, 3):
        resized = transforms.Resize((256, 256))(load_image(ds.paths[i]))
        img = F.hflip(resized) if flip else resized  # the reference flips, then crops
        ref = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)(F.to_tensor(F.crop(img, top, left, 224, 224)))
        got = augment_batch(cached[i]["image"][None], train=True, params=AugmentParams((flip,), (top,), (left,)))
        assert torch.equal(got[0], ref)


@pytest.mark.parametrize("make", [_tad, _ava], ids=["tad66k", "ava"])
def test_train_batch_equals_reference_transform_for_the_same_rng_state(data, tmp_path, make):
    ds = make(data, train=True)
    cached = _built(ds, tmp_path / "cache")
    torch.manual_seed(123)
    ref = torch.stack([ds[i]["image"] for i in range(len(ds))])  # the reference draws flip, top, left per image
    torch.manual_seed(123)
    got = augment_batch(torch.stack([cached[i]["image"] for i in range(len(ds))]), train=True)
    assert torch.equal(got, ref)
    params = sample_augment_params(200, 256, 256, train=True, generator=torch.Generator().manual_seed(0))
    assert 0 < sum(params.flip) < 200 and {min(params.top), max(params.top)} == {0, 32}


def test_augment_batch_refuses_bad_input():
    with pytest.raises(ValueError, match="uint8"):
        augment_batch(torch.zeros(1, 3, 224, 224), train=False)
    with pytest.raises(ValueError, match="224x224, got 256x256"):
        augment_batch(torch.zeros(1, 3, 256, 256, dtype=torch.uint8), train=False)


def test_cache_spec_of_the_reference_transforms_and_refusals(data):
    train, test = cache_spec(_tad(data, True).transform), cache_spec(_tad(data, False).transform)
    assert (train.height, train.width, train.flip, train.crop) == (256, 256, True, 224)
    assert (test.height, test.width, test.flip, test.crop) == (224, 224, False, None)
    ava = cache_spec(_ava(data, True).transform)
    assert (ava.height, ava.flip, ava.crop) == (224, True, None) and "PilResize" in ava.resize[0]
    tail = [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    with pytest.raises(ValueError, match="fixed"):
        cache_spec(transforms.Compose([transforms.Resize(256), *tail]))
    with pytest.raises(ValueError, match="ColorJitter"):
        cache_spec(transforms.Compose([transforms.Resize((224, 224)), transforms.ColorJitter(0.1), *tail]))
    with pytest.raises(ValueError, match="p=0.5"):
        cache_spec(transforms.Compose([transforms.Resize((224, 224)), transforms.RandomHorizontalFlip(0.3), *tail]))


def test_subset_of_the_cached_split_is_matched_by_name(data, tmp_path):
    build_cache(_tad(data, train=False), tmp_path / "cache", workers=0, progress=False)
    ds = _tad(data, train=False)
    ds.keep([i % 3 == 1 for i in range(len(ds))])
    cached = CachedDataset(ds, tmp_path / "cache")
    assert len(cached) == 3
    for i in range(3):
        assert cached[i]["path"] == ds[i]["path"] and cached[i]["index"] == i
        assert torch.equal(normalise(cached[i]["image"][None])[0], ds[i]["image"])


# --------------------------------------------------------------------------- staleness

def test_changed_score_is_refused_naming_it(data, tmp_path):
    _built(_tad(data, train=False), tmp_path / "cache")
    csv = data / "scores.csv"
    csv.write_text(csv.read_text().replace("img_02.jpg,2.00", "img_02.jpg,7.00"))
    with pytest.raises(StaleCacheError) as err:
        CachedDataset(_tad(data, train=False), tmp_path / "cache")
    msg = str(err.value)
    assert "scores.csv" in msg and "score of 'img_02.jpg' is 7.0, was 2.0" in msg and "rebuild" in msg


def test_replaced_image_is_refused_naming_it(data, tmp_path):
    _built(_tad(data, train=False), tmp_path / "cache")
    target = data / "images" / "img_04.jpg"
    st = target.stat()
    Image.new("RGB", (50, 40), (255, 0, 0)).save(target)
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(StaleCacheError, match=r"img_04\.jpg \(size \d+ -> \d+ bytes\)"):
        CachedDataset(_tad(data, train=False), tmp_path / "cache")


def test_touched_image_is_refused(data, tmp_path):
    _built(_tad(data, train=False), tmp_path / "cache")
    target = data / "images" / "img_01.jpg"
    st = target.stat()
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(StaleCacheError, match="img_01.jpg .modified after the cache was built"):
        CachedDataset(_tad(data, train=False), tmp_path / "cache")


def test_other_transform_theme_or_folder_is_refused(data, tmp_path):
    _built(_tad(data, train=True), tmp_path / "cache")
    with pytest.raises(StaleCacheError, match="transform"):
        CachedDataset(_tad(data, train=False), tmp_path / "cache")
    csv = data / "scores.csv"
    csv.write_text(csv.read_text().replace("img_05.jpg,3.50,b", "img_05.jpg,3.50,c"))
    with pytest.raises(StaleCacheError, match="theme of 'img_05.jpg' is 'c', was 'b'"):
        CachedDataset(_tad(data, train=True), tmp_path / "cache")
    csv.write_text(csv.read_text().replace("img_05.jpg,3.50,c", "img_05.jpg,3.50,b"))
    CachedDataset(_tad(data, train=True), tmp_path / "cache")  # back as it was: fine again
    os.rename(data / "images", data / "moved")
    moved = ScoreImageDataset(data / "scores.csv", data / "moved", train=True)
    with pytest.raises(StaleCacheError, match="image folder .*moved"):
        CachedDataset(moved, tmp_path / "cache")


def test_missing_or_unfinished_cache_is_refused(data, tmp_path):
    ds = _tad(data, train=False)
    with pytest.raises(CacheError, match="no cache"):
        CachedDataset(ds, tmp_path / "nothing")

    def stop(chunk):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_cache(ds, tmp_path / "cache", chunk_size=4, workers=0, progress=False, on_chunk=stop, command="CMD")
    with pytest.raises(CacheError, match="unfinished .1 of 3 chunks.*CMD"):
        CachedDataset(ds, tmp_path / "cache")


# --------------------------------------------------------------------------- building

def test_interrupted_build_resumes_with_the_missing_chunks_only(data, tmp_path):
    ds = _tad(data, train=True)
    clean = build_cache(ds, tmp_path / "clean", chunk_size=2, workers=0, progress=False)
    assert sorted(clean.built) == list(range(5)) and clean.reused == 0
    seen = []

    def stop_after_two(chunk):
        seen.append(chunk)
        if len(seen) == 2:
            raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        build_cache(ds, tmp_path / "cache", chunk_size=2, workers=0, progress=False, on_chunk=stop_after_two)
    resumed = build_cache(ds, tmp_path / "cache", chunk_size=2, workers=0, progress=False)
    assert resumed.reused == 2 and sorted(resumed.built) == [2, 3, 4]
    assert (tmp_path / "cache" / PIXELS_FILE).read_bytes() == (tmp_path / "clean" / PIXELS_FILE).read_bytes()
    again = build_cache(ds, tmp_path / "cache", chunk_size=2, workers=0, progress=False)
    assert again.built == [] and again.reused == 5


@pytest.mark.slow
def test_parallel_build_equals_in_process_build(data, tmp_path):
    ds = _tad(data, train=False)
    build_cache(ds, tmp_path / "one", chunk_size=2, workers=0, progress=False)
    report = build_cache(ds, tmp_path / "two", chunk_size=2, workers=2, progress=False)
    assert sorted(report.built) == list(range(5))
    assert (tmp_path / "one" / PIXELS_FILE).read_bytes() == (tmp_path / "two" / PIXELS_FILE).read_bytes()


def test_changed_data_is_rebuilt_from_scratch(data, tmp_path):
    _built(_tad(data, train=False), tmp_path / "cache")
    csv = data / "scores.csv"
    csv.write_text(csv.read_text().replace("img_02.jpg,2.00", "img_02.jpg,7.00"))
    report = build_cache(_tad(data, train=False), tmp_path / "cache", chunk_size=4, workers=0, progress=False)
    assert report.reused == 0 and sorted(report.built) == [0, 1, 2]
    assert CachedDataset(_tad(data, train=False), tmp_path / "cache")[2]["score"] == 7.0


def test_bad_image_stops_the_build_or_is_skipped(data, tmp_path):
    (data / "images" / "img_06.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match="img_06.jpg"):
        build_cache(_tad(data, train=False), tmp_path / "strict", workers=0, progress=False)
    ds = _tad(data, train=False, skip_bad=True)
    report = build_cache(ds, tmp_path / "cache", chunk_size=4, workers=0, progress=False)
    assert list(report.bad) == [6]
    cached = CachedDataset(ds, tmp_path / "cache")
    assert cached[6] is None and ds[6] is None and cached[5] is not None
    with pytest.raises(DataError, match="img_06.jpg"):  # as the uncached dataset without skip_bad
        CachedDataset(_tad(data, train=False), tmp_path / "cache")[6]


# --------------------------------------------------------------------------- engine and CLI

class _Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 4, 5, stride=4)
        self.fc = torch.nn.Linear(4, 1)

    def forward(self, x):
        return torch.sigmoid(self.fc(self.conv(x).mean((2, 3))))


def test_engine_gives_the_same_predictions_from_the_cache(data, tmp_path):
    ds = _tad(data, train=False)
    cached = _built(ds, tmp_path / "cache")
    model, cpu = _Tiny(), torch.device("cpu")
    runs = []
    for source, workers in ((ds, 0), (cached, 0), (cached, 1)):
        loader = make_loader(source, batch_size=4, train=False, num_workers=workers, device=cpu,
                             collate_fn=collate_skip_none)
        runs.append(infer(model, loader, cpu, progress=False))
    for other in runs[1:]:
        assert other.index == runs[0].index and other.path == runs[0].path and other.theme == runs[0].theme
        assert np.array_equal(np.stack(other.output), np.stack(runs[0].output))


def test_engine_trains_on_uint8_batches(data, tmp_path):
    cached = _built(_tad(data, train=True), tmp_path / "cache")
    model, cpu = _Tiny(), torch.device("cpu")
    before = model.fc.weight.detach().clone()
    loader = make_loader(cached, batch_size=4, train=True, num_workers=0, device=cpu, collate_fn=collate_skip_none)
    loss = train_one_epoch(model, loader, torch.optim.SGD(model.parameters(), lr=0.1), torch.nn.MSELoss(), cpu,
                           progress=False, channels_last=True)
    assert np.isfinite(loss) and not torch.equal(before, model.fc.weight)


def test_prepare_cache_cli(data, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("prepare_cache", REPO / "tools" / "prepare_cache.py")
    prepare_cache = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prepare_cache)
    argv = ["--dataset", "csv", "--train_csv", str(data / "scores.csv"), "--val_csv", str(data / "scores.csv"),
            "--test_csv", str(data / "scores.csv"), "--path_to_images", str(data / "images"),
            "--out", str(tmp_path / "out"), "--workers", "0", "--chunk_size", "4", "--quiet"]
    assert prepare_cache.main(argv) == 0
    assert "test: 9 images" in capsys.readouterr().out
    for split in ("train", "val", "test"):
        train = split == "train"
        CachedDataset(ScoreImageDataset(data / "scores.csv", data / "images", train=train), tmp_path / "out" / split)
    assert prepare_cache.main(argv) == 0
    assert "0 of 3 chunks built now, 3 already done" in capsys.readouterr().out
    assert prepare_cache.main([*argv[:2], "--train_csv", str(data / "none.csv"), *argv[4:]]) == 1
    assert "none.csv" in capsys.readouterr().err


def test_full_disk_is_a_clear_error(data, tmp_path, monkeypatch):
    import errno

    def no_space(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", no_space, raising=False)
    with pytest.raises(CacheError, match=r"not enough disk space .*pixels\.u8.* needs 0\.00 GB"):
        build_cache(_tad(data, train=False), tmp_path / "cache", workers=0, progress=False)
