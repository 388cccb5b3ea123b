"""Scoring an .onnx export on a light install (requirements-score.txt: onnxruntime, numpy, Pillow, tqdm):
predict.py and Scorer run with torch, torchvision, pandas, scipy, requests and onnx unimportable; the
numpy evaluation transform equals torchvision's to the bit; the light path gives the .pth's float32
scores within 1e-4; tampered files are refused with one line."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

from imagedata.images import EvalTransform, load_image
from onnx_helpers import needs_onnx, run_torch_free, tiny_onnx, tiny_outputs


def photos(folder, n=3, size=(90, 60)):
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        path = folder / f"p{i}.jpg"
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


@pytest.mark.parametrize("style", ["tad66k", "ava"])
def test_the_numpy_evaluation_transform_is_torchvisions_to_the_bit(style):
    torch = pytest.importorskip("torch")
    transforms = pytest.importorskip("torchvision.transforms")
    rng = np.random.default_rng(1)
    transform = EvalTransform(style)
    reference = transforms.Compose([transforms.ToTensor(),
                                    transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    for height, width in ((683, 1024), (37, 50), (224, 224), (1, 300)):
        img = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        array = transform.array(img)
        assert array.dtype == np.float32 and array.shape == (3, 224, 224) and array.flags.c_contiguous
        assert torch.equal(torch.from_numpy(array), reference(transform.resize(img)))
        assert torch.equal(transform(img), torch.from_numpy(array))  # the tensor path is the same numbers


@pytest.mark.parametrize("variant", ["tad66k", "ava"])
def test_predict_and_scorer_score_an_onnx_without_torch(tmp_path, variant):
    needs_onnx()
    tiny_onnx(tmp_path / "tiny.onnx", variant=variant)
    images = photos(tmp_path / "photos")
    (tmp_path / "photos" / "broken.jpg").write_bytes(b"not a jpeg")
    result = run_torch_free("""
import predict
from scoring import Scorer
status = predict.main(["photos", "--path_to_model_weight", "tiny.onnx", "--output", "out.csv", "--quiet"])
scorer = Scorer("tiny.onnx", batch_size=2, num_workers=2)
detailed = scorer.score_detailed(["photos/p0.jpg", "photos/broken.jpg", "photos/p1.jpg", "photos/p2.jpg"])
result = {"status": status, "path": scorer.path, "single": scorer.score("photos/p2.jpg"),
          "scores": [r.score for r in detailed], "errors": [r.error for r in detailed],
          "std": [r.std for r in detailed], "device": [str(scorer.device), scorer.device.type]}
""", cwd=tmp_path)
    assert result["modules"] == [], result["modules"]
    assert result["status"] == 1  # one image failed: the broken one
    assert "onnxruntime" in result["path"] and result["device"] == ["cpu", "cpu"]
    width = 1 if variant == "tad66k" else 10
    transform = EvalTransform(variant)
    outputs = tiny_outputs(np.stack([transform.array(load_image(p)) for p in images]), width)
    expected = outputs[:, 0] * 10 if width == 1 else outputs @ np.arange(1, 11)
    with open(tmp_path / "out.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["image"] for r in rows] == ["photos/broken.jpg", "photos/p0.jpg", "photos/p1.jpg", "photos/p2.jpg"]
    assert rows[0]["score"] == "" and "broken.jpg" in rows[0]["error"]
    assert np.allclose([float(r["score"]) for r in rows[1:]], expected, atol=1e-5)
    assert result["errors"][1] is not None and "broken.jpg" in result["errors"][1]
    scores = [s for s in result["scores"] if s is not None]
    assert np.allclose(scores, expected, atol=1e-5) and abs(result["single"] - expected[2]) < 1e-5
    assert (result["std"][0] is None) == (variant == "tad66k")


def test_decoding_threads_keep_the_order_and_the_scores(tmp_path):
    needs_onnx()
    from scoring import Scorer

    model = tiny_onnx(tmp_path / "tiny.onnx")
    images = [str(p) for p in photos(tmp_path / "photos", n=7)]
    images.insert(3, str(tmp_path / "missing.jpg"))
    alone = Scorer(model, batch_size=1).score_detailed(images)
    threaded = Scorer(model, batch_size=2, num_workers=2).score_detailed(images)
    assert [r.image for r in threaded] == images
    assert [r.score for r in threaded] == [r.score for r in alone]
    assert threaded[3].error is not None and "missing.jpg" in threaded[3].error


TAMPERED = {  # what is changed in a good file -> what the error line must say
    "variant": ({"metadata": {"tanet.variant": "bogus"}}, "variant 'bogus'"),
    "width": ({"variant": "ava", "width": 1}, "output 'output' is (N, 1)"),
    "size": ({"size": 112}, "(N, 3, 112, 112)"),
    "input": ({"input_name": "pixels"}, "'pixels'"),
    "format": ({"metadata": {"tanet.format": None}}, "not a TANet ONNX export"),
}


@pytest.mark.parametrize("change", sorted(TAMPERED))
def test_a_tampered_onnx_file_is_refused_with_one_line(tmp_path, capsys, change):
    needs_onnx()
    import predict

    options, says = TAMPERED[change]
    model = tiny_onnx(tmp_path / f"{change}.onnx", **options)
    (image,) = photos(tmp_path / "photos", n=1)
    status = predict.main([str(image), "--path_to_model_weight", str(model), "--output", str(tmp_path / "o.csv")])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1, err
    assert err[0].startswith("predict.py: error:") and str(model) in err[0] and says in err[0], err[0]
    assert not (tmp_path / "o.csv").exists()


def test_a_folder_or_a_missing_file_as_the_onnx_model(tmp_path, capsys):
    needs_onnx()
    import predict

    (image,) = photos(tmp_path / "photos", n=1)
    (tmp_path / "model.onnx").mkdir()
    for model, says in ((tmp_path / "model.onnx", "is a folder"), (tmp_path / "gone.onnx", "not found")):
        assert predict.main([str(image), "--path_to_model_weight", str(model)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and str(model) in err[0] and says in err[0], err


@pytest.fixture(scope="module")
def exported(golden_onnx):
    """{variant: (checkpoint, .onnx)} of golden-weight TANets (a real export: slow)."""
    return golden_onnx


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["tad66k", "ava"])
def test_the_light_path_gives_the_checkpoints_float32_scores(exported, tmp_path, variant):
    import predict

    checkpoint, model = exported[variant]
    photos(tmp_path / "photos", n=4, size=(1024, 683))
    result = run_torch_free(f"""
import predict
result = {{"status": predict.main(["photos", "--path_to_model_weight", {str(model)!r}, "--output", "light.json",
                                   "--quiet"])}}
""", cwd=tmp_path)
    assert result == {"status": 0, "modules": []}
    assert predict.main([str(tmp_path / "photos"), "--path_to_model_weight", str(checkpoint), "--output",
                         str(tmp_path / "full.json"), "--device", "cpu", "--amp", "none", "--quiet"]) == 0
    light = json.loads((tmp_path / "light.json").read_text())
    full = json.loads((tmp_path / "full.json").read_text())
    assert [r["image"].split("/")[-1] for r in light] == [r["image"].split("/")[-1] for r in full]
    assert max(abs(a["score"] - b["score"]) for a, b in zip(light, full)) < 1e-4
    if variant == "ava":
        assert max(abs(a["std"] - b["std"]) for a, b in zip(light, full)) < 1e-4
