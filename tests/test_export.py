"""ONNX export (tools/export.py, export.py): parity with PyTorch's isolated outputs for both variants
and batch sizes 1, 3 and 16, batch-independent scores, the metadata, and predict.py on an .onnx file.
Needs the optional extra (requirements-deploy.txt): skipped without it."""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import predict
from scoring.onnx_export import ExportError, OnnxModel, metadata, read_metadata
from golden import golden_input, golden_state_dict
from models import TANet
from scoring import Scorer, ScoringError

REPO = Path(__file__).resolve().parents[1]


def needs_extra():
    for module in ("onnx", "onnxruntime", "onnxscript"):
        pytest.importorskip(module, reason=f"the ONNX tests need {module} (pip install -r requirements-deploy.txt)")


@pytest.fixture(scope="module")
def exported(golden_onnx):
    """{variant: (checkpoint, .onnx)} of golden-weight TANets."""
    return golden_onnx


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["tad66k", "ava"])
def test_onnxruntime_gives_pytorchs_isolated_outputs_at_every_batch_size(exported, variant):
    ckpt, onnx_file = exported[variant]
    model = TANet(variant, theme_fusion="isolated")
    model.load_state_dict(golden_state_dict(variant))
    runtime = OnnxModel(onnx_file)
    x = golden_input(16)
    with torch.no_grad():
        ref = model.eval()(x)
    alone = torch.cat([runtime(x[i:i + 1]) for i in range(16)])
    for batch in (1, 3, 16):
        got = torch.cat([runtime(x[i:i + batch]) for i in range(0, 16, batch)])
        assert (got - ref).abs().max() < 1e-4, batch
        assert (got - alone).abs().max() < 1e-6, batch  # an image's score does not depend on its batch-mates
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    output, score = session.run(None, {"image": x[:3].numpy()})
    expected = output[:, 0] * 10 if variant == "tad66k" else output @ np.arange(1, 11)
    assert np.allclose(score, expected, atol=1e-5) and score.shape == (3,)


@pytest.mark.slow
def test_the_file_carries_its_preprocessing_contract(exported):
    ckpt, onnx_file = exported["ava"]
    info = read_metadata(onnx_file)
    assert info["tanet.variant"] == "ava" and info["tanet.theme_fusion"] == "isolated"
    pre = json.loads(info["tanet.preprocessing"])
    assert pre["input_shape"] == [1, 3, 224, 224] and pre["mean"] == [0.485, 0.456, 0.406]
    assert "bicubic" in pre["resize"] and "1..10" in json.loads(info["tanet.outputs"])["output"]
    assert info["tanet.source_checkpoint"] == ckpt.name


@pytest.mark.slow
def test_predict_scores_with_an_onnx_file_as_with_the_checkpoint(exported, tmp_path, capsys):
    ckpt, onnx_file = exported["tad66k"]
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)).save(folder / f"p{i}.jpg")
    rows = {}
    for name, weights in (("onnx", onnx_file), ("torch", ckpt)):
        out = tmp_path / f"{name}.csv"
        assert predict.main([str(folder), "--path_to_model_weight", str(weights), "--output", str(out), "--device",
                             "cpu", "--num_workers", "0", "--quiet"]) == 0
        with open(out, newline="") as f:
            rows[name] = list(csv.DictReader(f))
    assert "onnxruntime" in capsys.readouterr().err
    assert [r["image"] for r in rows["onnx"]] == [r["image"] for r in rows["torch"]]
    assert all(abs(float(a["score"]) - float(b["score"])) < 1e-4 for a, b in zip(rows["onnx"], rows["torch"]))
    with pytest.raises(ScoringError, match="isolated theme fusion only"):
        Scorer(onnx_file, device="cpu", theme_fusion="batch")


@pytest.mark.slow
def test_the_export_tool(exported, tmp_path, capsys):
    ckpt, _ = exported["tad66k"]
    sys.path.insert(0, str(REPO / "tools"))
    try:
        from scoring import onnx_export as module  # the library; the tool is tools/export.py
        from importlib import util

        spec = util.spec_from_file_location("export_tool", REPO / "tools" / "export.py")
        tool = util.module_from_spec(spec)
        spec.loader.exec_module(tool)
    finally:
        sys.path.remove(str(REPO / "tools"))
    assert module.ONNX_FORMAT == "tanet-onnx/1"
    assert tool.main([str(ckpt), "--out", str(tmp_path / "t.onnx")]) == 0
    assert "max |difference|" in capsys.readouterr().out
    assert tool.main([str(ckpt), "--out", str(tmp_path / "t.bin")]) == 1
    assert ".onnx" in capsys.readouterr().err


def export_tool():
    from importlib import util

    spec = util.spec_from_file_location("export_tool", REPO / "tools" / "export.py")
    tool = util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def test_an_export_with_non_finite_outputs_fails_and_leaves_no_file(tmp_path, capsys):
    pytest.importorskip("onnx", reason="the export needs onnx (pip install -r requirements-deploy.txt)")
    checkpoint = tmp_path / "nan.pth"
    state = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
             for k, v in golden_state_dict("tad66k").items()}
    torch.save({"model": state, "variant": "tad66k"}, checkpoint)
    assert export_tool().main([str(checkpoint), "--out", str(tmp_path / "nan.onnx")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "non-finite" in err[0] and str(checkpoint) in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nan.pth"]


def test_the_parity_check_refuses_a_difference_beyond_its_tolerance_or_not_finite(tmp_path):
    from scoring import onnx_export as module
    x = np.zeros((3, 3, 224, 224), np.float32)
    ref = np.full((3, 1), 0.5, np.float32)

    class Session:
        def __init__(self, output):
            self.output = output

        def run(self, names, feeds):
            assert names == ["output"] and feeds["image"] is x
            return [self.output]

    assert module._parity(Session(ref + 1e-6), x, ref, tmp_path / "m.pth") < module.PARITY_TOLERANCE
    for bad in (ref + 2 * module.PARITY_TOLERANCE, np.full_like(ref, np.nan)):
        with pytest.raises(ExportError, match="differs from PyTorch by"):
            module._parity(Session(bad), x, ref, tmp_path / "m.pth")


@pytest.mark.slow
def test_an_export_beyond_the_parity_tolerance_leaves_no_file(tmp_path, capsys, monkeypatch):
    needs_extra()
    from scoring import onnx_export as module
    checkpoint = tmp_path / "m.pth"
    torch.save({"model": golden_state_dict("tad66k"), "variant": "tad66k"}, checkpoint)
    monkeypatch.setattr(module, "PARITY_TOLERANCE", -1.0)  # no difference is within it
    assert export_tool().main([str(checkpoint), "--out", str(tmp_path / "m.onnx")]) == 1
    assert "differs from PyTorch" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pth"]


def test_the_export_tool_says_a_folder_is_a_folder(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "best.pth").write_bytes(b"")
    assert export_tool().main([str(tmp_path / "run"), "--out", str(tmp_path / "m.onnx")]) == 1
    err = capsys.readouterr().err
    assert "is a folder" in err and "best.pth" in err and "not found" not in err


def test_metadata_and_refusals_without_exporting(tmp_path):
    model = TANet("tad66k", branches=("aesthetics", "rgb"))
    ckpt = tmp_path / "m.pth"
    torch.save(model.state_dict(), ckpt)
    info = metadata(model, ckpt)
    assert info["tanet.branches"] == "aesthetics,rgb" and json.loads(info["tanet.preprocessing"])["std"][0] == 0.229
    pytest.importorskip("onnxruntime", reason="needs onnxruntime (requirements-deploy.txt)")
    bogus = tmp_path / "bogus.onnx"
    bogus.write_bytes(b"not an onnx file")
    with pytest.raises(ExportError, match="cannot be loaded"):
        OnnxModel(bogus)
