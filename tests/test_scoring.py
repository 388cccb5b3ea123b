"""scoring/ (inputs, scorer, results): finding images, the Scorer API, batch independence, streaming, ranking and
writing results."""
from __future__ import annotations

import copy
import csv
import importlib.util
import json
import random
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imagedata import images as images_module
import scoring.scorer
from dataset import build_transform, load_image
from models import TANet, load_tanet
from helpers.runtime import scoring_parallelism
from models import get_pretrained_cfg
from scoring import ScoreResult, Scorer, ScoringError, ScoringWarning, collect_images, rank_results, write_results

RELEASED = {v: get_pretrained_cfg(v).weight_file for v in ("tad66k", "ava")}  # the released weight files


def _image(path, seed, size=(36, 24), mode="RGB"):
    rng = np.random.default_rng(seed)
    w, h = size
    base = rng.integers(0, 256, 3)  # a different dominant colour per seed, so scores differ
    pixels = np.clip(base + rng.integers(-60, 60, (h, w, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(pixels, "RGB")
    path.parent.mkdir(parents=True, exist_ok=True)
    (img.convert(mode) if mode != "RGB" else img).save(path)
    return path


pytestmark = pytest.mark.usefixtures("one_thread")


CPU = torch.device("cpu")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    tad, ava = TANet("tad66k"), TANet("ava")
    torch.save(tad.state_dict(), root / "tad66k.pth")
    torch.save(ava.state_dict(), root / "ava.pth")
    torch.save({"model": ava.state_dict(), "variant": "ava", "epoch": 3}, root / "ava_training.pth")
    return root


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    return [str(_image(root / f"img{i:02d}.jpg", seed=i, size=(30 + 3 * i, 20 + 2 * i))) for i in range(9)]


@pytest.fixture(scope="module")
def tad_scorer(ckpts):
    return Scorer(ckpts / "tad66k.pth", device="cpu")


def _run(scorer, sources, batch_size):
    old, scorer.batch_size = scorer.batch_size, batch_size
    try:
        return {r.image: r.score for r in scorer.score_detailed(sources)}
    finally:
        scorer.batch_size = old


@pytest.fixture(scope="module")
def alone(tad_scorer, images):
    """Every image's score in a batch of its own."""
    return _run(tad_scorer, images, 1)


# --------------------------------------------------------------------------- weights and variants

@pytest.mark.parametrize("name, variant", [("tad66k.pth", "tad66k"), ("ava.pth", "ava"), ("ava_training.pth", "ava")])
def test_variant_is_read_from_the_checkpoint(ckpts, name, variant):
    scorer = Scorer(ckpts / name, device="cpu")
    assert scorer.variant == variant
    assert scorer.model.theme_fusion == "isolated"


def test_variant_that_contradicts_the_checkpoint_is_refused(ckpts):
    with pytest.raises(ScoringError, match=r"is a 'ava' model, but variant 'tad66k'"):
        Scorer(ckpts / "ava_training.pth", variant="tad66k", device="cpu")
    assert Scorer(ckpts / "ava.pth", variant="ava", device="cpu").variant == "ava"


def test_no_weights_says_how_to_get_them():
    with pytest.raises(ScoringError) as info:
        Scorer(None)
    message = str(info.value)
    assert RELEASED["tad66k"] in message and RELEASED["ava"] in message
    assert "--download" in message and "main_nni.py" in message


def test_released_name_is_found_in_the_checkpoints_folder(ckpts, tmp_path, monkeypatch):
    monkeypatch.delenv("TANET_CHECKPOINTS", raising=False)
    shutil.copy(ckpts / "tad66k.pth", tmp_path / RELEASED["tad66k"])
    scorer = Scorer(RELEASED["tad66k"], checkpoints_dir=tmp_path, device="cpu")
    assert scorer.checkpoint == tmp_path / RELEASED["tad66k"] and scorer.variant == "tad66k"
    monkeypatch.setenv("TANET_CHECKPOINTS", str(tmp_path))
    assert Scorer(RELEASED["tad66k"], device="cpu").checkpoint == tmp_path / RELEASED["tad66k"]
    with pytest.raises(FileNotFoundError, match="--download"):
        Scorer(RELEASED["ava"], checkpoints_dir=tmp_path, device="cpu")


def test_a_backbone_file_is_not_taken_for_a_tanet(ckpts, tmp_path):
    torch.save({"features.0.weight": torch.zeros(3)}, tmp_path / "mobilenetv2.pth")
    with pytest.raises(ScoringError, match="cannot be told"):
        Scorer(tmp_path / "mobilenetv2.pth", device="cpu")
    with pytest.raises(ValueError, match="does not look like a TANet checkpoint"):
        Scorer(tmp_path / "mobilenetv2.pth", variant="tad66k", device="cpu")


@pytest.mark.parametrize("kwargs, match", [
    ({"batch_size": 0}, "batch_size"), ({"num_workers": -1}, "num_workers"), ({"amp": "fp8"}, "amp"),
    ({"amp": "fp16"}, "fp16 needs a CUDA device"), ({"theme_fusion": "mixed"}, "theme_fusion"),
    ({"variant": "nima"}, "unknown variant"),
])
def test_bad_options_are_refused(ckpts, kwargs, match):
    with pytest.raises(ValueError, match=match):
        Scorer(ckpts / "tad66k.pth", device="cpu", **kwargs)


# --------------------------------------------------------------------------- scoring

def test_scores_do_not_depend_on_batch_size_or_order(tad_scorer, images, alone):
    shuffled = list(images)
    random.Random(0).shuffle(shuffled)
    for batch_size, order in ((7, images), (64, images), (7, shuffled)):
        got = _run(tad_scorer, order, batch_size)
        assert got.keys() == alone.keys()
        assert all(abs(got[k] - alone[k]) < 1e-5 for k in alone), batch_size
    assert all(1.0 <= s <= 10.0 for s in alone.values())
    assert len({round(s, 6) for s in alone.values()}) == len(images)  # distinct images, distinct scores


def test_ava_scores_are_the_distribution_mean_and_batch_independent(ckpts, images):
    scorer = Scorer(ckpts / "ava.pth", device="cpu", batch_size=2)
    together = scorer.score_detailed(images[:2])
    scorer.batch_size = 1
    alone = scorer.score_detailed(images[:2])
    for a, b in zip(together, alone):
        assert abs(a.score - b.score) < 1e-5
        dist = np.array(a.distribution)
        assert dist.shape == (10,) and abs(dist.sum() - 1) < 1e-5
        assert a.score == pytest.approx(dist @ np.arange(1, 11))
        assert a.std == pytest.approx(np.sqrt(dist @ (np.arange(1, 11) - a.score) ** 2))


def test_batch_fusion_warns_and_couples_the_scores(ckpts, images, alone):
    with pytest.warns(ScoringWarning, match="depends on the other images of its batch"):
        scorer = Scorer(ckpts / "tad66k.pth", device="cpu", theme_fusion="batch")
    coupled = scorer.score(images[:2])
    # a lone image's theme feature is the same in both modes, a pair's is not
    assert max(abs(c - alone[p]) for c, p in zip(coupled, images[:2])) > 1e-4
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Scorer(ckpts / "tad66k.pth", device="cpu")  # isolated: no warning


def test_paths_pil_images_and_tensors_give_the_same_score(tad_scorer, images, alone):
    path = images[3]
    by_path = tad_scorer.score(path)
    assert isinstance(by_path, float) and by_path == alone[path]
    image = load_image(path)
    assert tad_scorer.score(image) == pytest.approx(by_path, abs=1e-6)
    tensor = build_transform("tad66k", train=False)(image)
    assert tad_scorer.score(tensor) == pytest.approx(by_path, abs=1e-5)
    assert tad_scorer.score(torch.stack([tensor, tensor])) == pytest.approx([by_path] * 2, abs=1e-5)
    mixed = tad_scorer.score([path, image])
    assert isinstance(mixed, list) and mixed == pytest.approx([by_path] * 2, abs=1e-6)
    assert tad_scorer.score([]) == []


def test_pil_images_in_other_modes_are_converted_like_files(tad_scorer, tmp_path):
    rgba = Image.new("RGBA", (30, 20), (200, 30, 30, 100))
    rgba.save(tmp_path / "a.png")
    assert tad_scorer.score(rgba) == pytest.approx(tad_scorer.score(tmp_path / "a.png"), abs=1e-6)
    detailed = tad_scorer.score_detailed(rgba)
    assert detailed[0].image == "<image 0>" and detailed[0].ok


def test_bad_inputs(tad_scorer, tmp_path):
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ScoringError, match="broken.jpg is not a readable image"):
        tad_scorer.score(tmp_path / "broken.jpg")
    [result] = tad_scorer.score_detailed([str(tmp_path / "gone.png")])
    assert result.score is None and not result.ok and "gone.png not found" in result.error
    with pytest.raises(ScoringError, match=r"\(3, 224, 224\)"):
        tad_scorer.score(torch.zeros(3, 100, 100))
    with pytest.raises(ScoringError, match="floating point"):
        tad_scorer.score(torch.zeros(3, 224, 224, dtype=torch.uint8))
    with pytest.raises(TypeError, match="item 1"):
        tad_scorer.score(["a.jpg", 3])
    with pytest.raises(TypeError, match="cannot score"):
        tad_scorer.score(42)


def test_non_finite_output_is_an_error_not_a_score(tad_scorer):
    model = copy.deepcopy(tad_scorer.model)
    with torch.no_grad():
        model.head[2].bias.fill_(float("nan"))
    [result] = Scorer.from_model(model).score_detailed(torch.zeros(1, 3, 224, 224))
    assert result.score is None and "non-finite" in result.error


def test_isolated_scoring_never_builds_the_theme_network(tad_scorer, ckpts):
    assert not tad_scorer.model.has_theme_network and not hasattr(tad_scorer.model, "res365_last")
    with pytest.raises(ValueError, match="without its theme network"):
        tad_scorer.model.theme_fusion = "batch"
    batch = Scorer(ckpts / "tad66k.pth", device="cpu", theme_fusion="batch")
    assert batch.model.has_theme_network


def test_from_model_scores_like_the_file_and_restores_the_model(ckpts, images, alone):
    model, _ = load_tanet(ckpts / "tad66k.pth")
    model.theme_fusion = "batch"
    model.train()
    scorer = Scorer.from_model(model)
    assert scorer.device == torch.device("cpu") and scorer.variant == "tad66k"
    assert scorer.score(images[0]) == pytest.approx(alone[images[0]], abs=1e-6)
    assert model.training and model.theme_fusion == "batch"
    with pytest.raises(TypeError, match="needs a TANet"):
        Scorer.from_model(torch.nn.Linear(2, 2))


def test_bf16_is_close_to_float32(tad_scorer, images, alone):
    scorer = Scorer.from_model(tad_scorer.model, amp="bf16")
    assert scorer.score(images[1]) == pytest.approx(alone[images[1]], abs=0.1)


def test_ten_thousand_paths_stream_through_the_loader(tad_scorer, images, monkeypatch, tmp_path):
    loaded = []
    real = scoring.scorer.load_image
    monkeypatch.setattr(scoring.scorer, "load_image", lambda p, **kw: (loaded.append(p), real(p, **kw))[1])
    paths = [images[0]] + [str(tmp_path / f"missing{i}.jpg") for i in range(9_999)]
    stream = tad_scorer.iter_results(paths)
    first = next(stream)
    assert first.ok and first.image == images[0]
    assert len(loaded) <= tad_scorer.batch_size  # only the first batch was read
    rest = list(stream)
    assert len(rest) == 9_999 and all(not r.ok for r in rest)
    assert rest[-1].image == paths[-1] and len(loaded) == 10_000


# --------------------------------------------------------------------------- finding images

def test_folder_lists_pillow_formats_in_any_case(tmp_path):
    for name in ("b.JPG", "a.png", "c.webp", "d.tif", "e.bmp", "f.jpeg"):
        _image(tmp_path / name, seed=1)
    (tmp_path / "notes.md").write_text("x")
    (tmp_path / "clip.mpg").write_bytes(b"\x00\x00\x01\xb3")
    _image(tmp_path / "._a.png", seed=1)  # macOS resource fork
    _image(tmp_path / "sub" / "g.png", seed=2)
    _image(tmp_path / ".cache" / "h.png", seed=2)
    names = [p.removeprefix(str(tmp_path) + "/") for p in collect_images([tmp_path])]
    assert names == ["a.png", "b.JPG", "c.webp", "d.tif", "e.bmp", "f.jpeg"]
    deep = [p.removeprefix(str(tmp_path) + "/") for p in collect_images([tmp_path], recursive=True)]
    assert deep == names + ["sub/g.png"]


def test_empty_folder_warns(tmp_path):
    (tmp_path / "sub").mkdir()
    _image(tmp_path / "sub" / "x.png", seed=0)
    with pytest.warns(ScoringWarning, match="--recursive"):
        assert collect_images([tmp_path]) == []


def test_text_and_csv_lists(tmp_path):
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "a.txt").write_text("# my picks\nx.jpg\n\n  sub/y.png  \n/abs/z.jpg\n", encoding="utf-8")
    assert collect_images([lists / "a.txt"]) == [str(lists / "x.jpg"), str(lists / "sub/y.png"), "/abs/z.jpg"]
    (lists / "b.csv").write_text("\ufeffimage,score\nx.jpg,5\n y.jpg ,6\n", encoding="utf-8")
    assert collect_images([lists / "b.csv"]) == [str(lists / "x.jpg"), str(lists / "y.jpg")]
    assert collect_images([lists / "b.csv"], path_to_images=tmp_path / "pics") == [
        str(tmp_path / "pics" / "x.jpg"), str(tmp_path / "pics" / "y.jpg")]
    # order is kept across arguments; a plain path is taken as an image
    assert collect_images(["one.jpg", lists / "a.txt"])[:2] == ["one.jpg", str(lists / "x.jpg")]


@pytest.mark.parametrize("name, text, match", [
    ("c.csv", "name\nx.jpg\n", "has no 'image' column"),
    ("c.csv", "image,score\nx.jpg,1\n,2\n", "row 2 has an empty image"),
    ("c.csv", "image\n", "header but no rows"),
    ("c.txt", "# nothing\n\n", "lists no images"),
    ("missing.txt", None, "not found"),
])
def test_bad_lists_are_refused(tmp_path, name, text, match):
    if text is not None:
        (tmp_path / name).write_text(text, encoding="utf-8")
    with pytest.raises(ScoringError, match=match):
        collect_images([tmp_path / name])


def test_list_that_is_not_utf8(tmp_path):
    (tmp_path / "l.txt").write_bytes(b"a.jpg\n\xff\xfe.jpg\n")
    with pytest.raises(ScoringError, match="line 2 is not valid UTF-8"):
        collect_images([tmp_path / "l.txt"])


# --------------------------------------------------------------------------- ranking and writing

RESULTS = [
    ScoreResult("a", 5.0), ScoreResult("b", error="broken"), ScoreResult("c", 7.0),
    ScoreResult("d", 3.0), ScoreResult("e", 7.0),
]


def _names(results):
    return [r.image for r in results]


def test_rank_results():
    assert _names(rank_results(RESULTS)) == ["a", "b", "c", "d", "e"]
    assert _names(rank_results(RESULTS, sort="none")) == ["a", "b", "c", "d", "e"]
    assert _names(rank_results(RESULTS, sort="desc")) == ["c", "e", "a", "d", "b"]  # ties in input order
    assert _names(rank_results(RESULTS, sort="asc")) == ["d", "a", "c", "e", "b"]
    assert _names(rank_results(RESULTS, top=2)) == ["c", "e"]
    assert _names(rank_results(RESULTS, top=9)) == ["c", "e", "a", "d"]  # failed images left out
    assert _names(rank_results(RESULTS, bottom=2)) == ["d", "a"]
    assert _names(rank_results(RESULTS, bottom=2, sort="desc")) == ["a", "d"]
    assert _names(rank_results(RESULTS, top=3, sort="none")) == ["a", "c", "e"]
    with pytest.raises(ScoringError, match="not both"):
        rank_results(RESULTS, top=1, bottom=1)
    with pytest.raises(ScoringError, match="top must be a positive"):
        rank_results(RESULTS, top=0)


def test_write_csv_and_json(tmp_path):
    ava = [ScoreResult("x.jpg", 5.5, 1.25, tuple([0.1] * 10)), ScoreResult("bad.jpg", error="truncated")]
    write_results(ava, tmp_path / "out.csv", "ava")
    with open(tmp_path / "out.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["image", "score", "std", *(f"p{k}" for k in range(1, 11)), "error"]
    assert rows[0]["score"] == "5.5" and rows[0]["std"] == "1.25" and rows[0]["p10"] == "0.1"
    assert rows[0]["error"] == "" and rows[1]["score"] == "" and rows[1]["p1"] == "" and rows[1]["error"] == "truncated"
    write_results(ava[:1] + [ScoreResult("y.jpg", 6.0)], tmp_path / "OUT.JSON", "tad66k")
    data = json.loads((tmp_path / "OUT.JSON").read_text(encoding="utf-8"))
    assert data == [{"image": "x.jpg", "score": 5.5, "error": ""}, {"image": "y.jpg", "score": 6.0, "error": ""}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["OUT.JSON", "out.csv"]  # no temp files left
    with pytest.raises(ScoringError, match="use a .csv, .json, .jsonl"):
        write_results(ava, tmp_path / "out.xlsx", "ava")


# --------------------------------------------------------------------------- the fast path

@pytest.mark.parametrize("variant", ["tad66k", "ava"])
def test_the_default_fast_path_scores_as_the_plain_model(ckpts, images, variant):
    """Folded BatchNorm, fused convolutions, channels-last, in float32 on every CPU (bf16 only when
    asked): the same scores as the plain model up to float rounding."""
    fast = Scorer(ckpts / f"{variant}.pth", device="cpu")
    plain = Scorer(ckpts / f"{variant}.pth", device="cpu", fast=False, amp="none")
    assert fast.fast and not plain.fast and "folded BatchNorm" in fast.path and fast.amp == "none"
    tolerance = 1e-4
    a, b = fast.score_detailed(images), plain.score_detailed(images)
    assert all(abs(x.score - y.score) < tolerance for x, y in zip(a, b))
    if variant == "ava":
        assert all(max(abs(p - q) for p, q in zip(x.distribution, y.distribution)) < tolerance / 10
                   for x, y in zip(a, b))


@pytest.mark.slow
def test_draft_decoding_is_an_option_that_changes_pixels_a_little(ckpts, tmp_path):
    photo = _image(tmp_path / "big.jpg", seed=3, size=(1024, 683))
    full = Scorer(ckpts / "tad66k.pth", device="cpu")
    draft = Scorer(ckpts / "tad66k.pth", device="cpu", draft=True)
    assert full.draft is None and "full decoding" in full.path and "reduced-size" in draft.path
    assert images_module.load_image(photo, draft=(224, 224)).size == (512, 342)  # JPEG decoded at half size
    assert abs(full.score(photo) - draft.score(photo)) < 0.5


def test_decoding_and_the_model_share_the_cores_without_oversubscribing_them():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert scoring_parallelism(cpu, 1) == (0, 1)
    assert scoring_parallelism(cpu, 2) == (1, 2)
    assert scoring_parallelism(cpu, 8) == (2, 6) and scoring_parallelism(cpu, 16) == (4, 12)
    assert scoring_parallelism(gpu, 16) == (8, 1)


@pytest.mark.slow
def test_the_draft_effect_tool_measures_draft_against_full_decoding(ckpts, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("draft_effect_tool", REPO / "tools" / "draft_effect.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    small = [_image(tmp_path / "small" / f"s{i}.jpg", seed=i, size=(256, 256)) for i in range(3)]
    (tmp_path / "truth.csv").write_text("image,score\n" + "".join(f"{p.name},{3 + i}\n" for i, p in enumerate(small)))
    # 256x256 JPEGs cannot be decoded at half size and stay at least 224: draft changes nothing
    out = tool.draft_effect(str(ckpts / "tad66k.pth"), [str(tmp_path / "small")], csv=str(tmp_path / "truth.csv"))
    assert out["images"] == 3 and out["max_abs_change"] == 0.0 and out["srcc_draft_vs_default"] == pytest.approx(1.0)
    assert out["srcc_default_vs_true"] == out["srcc_draft_vs_true"]
    big = [_image(tmp_path / "big" / f"b{i}.jpg", seed=i, size=(1024, 683)) for i in range(3)]
    assert tool.main([str(ckpts / "tad66k.pth"), *map(str, big), "--json", str(tmp_path / "d.json")]) == 0
    figures = json.loads((tmp_path / "d.json").read_text())
    assert 0 < figures["max_abs_change"] < 0.5 and figures["changed_images"] >= 1  # other pixels, other scores
    assert "max_abs_change:" in capsys.readouterr().out
    assert tool.main([str(ckpts / "tad66k.pth"), str(big[0])]) == 1  # one image: nothing to rank
