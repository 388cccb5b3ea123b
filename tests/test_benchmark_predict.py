"""tools/benchmark.py --predict: the rows of each engine and of the library of tiny images."""
from __future__ import annotations

import argparse

from test_fast_paths import _benchmark_tool  # tools/benchmark.py as a module


def test_engine_and_library_rows(tmp_path, monkeypatch):
    bench = _benchmark_tool()
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(3):
        (photos / f"p{i}.jpg").write_bytes(b"x")
    calls = []

    def predict_run(repo, folder, checkpoint, out, extra):
        calls.append((folder.name, sum(1 for _ in folder.iterdir()), extra.split()))
        return 2.0, 100.0 + len(calls), ""

    monkeypatch.setattr(bench, "predict_run", predict_run)
    args = argparse.Namespace(engines=["local", "ray"], library=150, images=3, predict_args="--draft")
    runs = bench.bench_engines(args, tmp_path, photos, tmp_path / "w.pth", lambda msg: None)
    assert calls == [("photos", 3, ["--draft", "--engine", "ray"]),  # local photos: the large run times them
                     ("library_150", 150, ["--draft", "--engine", "local"]),
                     ("library_150", 150, ["--draft", "--engine", "ray"])]
    assert runs["150 tiny images, ray"] == {"images": 150, "seconds": 2.0, "images_per_s": 75.0,
                                            "peak_memory_mb": 103.0}
    table = bench.predict_table({"photos": [1, 3], "image_size": [8, 8], "path": "p", "checkouts": {},
                                 "engines": runs})
    assert "150 tiny images, local: 75.0 images/s end to end, peak 102 MiB" in table


def test_the_light_install_row_scores_one_photo_with_an_export_under_the_given_interpreter(tmp_path, monkeypatch):
    from scoring import onnx_export as export
    bench = _benchmark_tool()
    exported, calls = [], []
    monkeypatch.setattr(export, "export_onnx", lambda ckpt, out: exported.append((ckpt, out)))

    def predict_run(repo, photo, model, out, extra, python):
        calls.append((photo.name, model.name, python))
        return [0.9, 0.7, 0.8][len(calls) - 1], 90.0 + len(calls), ""

    monkeypatch.setattr(bench, "predict_run", predict_run)
    args = argparse.Namespace(light_python="/venv/bin/python", repeats=3)
    light = bench.bench_light(args, tmp_path, tmp_path / "one", tmp_path / "w.pth", lambda msg: None)
    assert exported == [(tmp_path / "w.pth", tmp_path / "tanet.onnx")]
    assert calls == [("one", "tanet.onnx", "/venv/bin/python")] * 3
    assert light == {"python": "/venv/bin/python", "one_photo_s": 0.8, "peak_memory_mb": 93.0}
    table = bench.predict_table({"photos": [1, 3], "image_size": [8, 8], "path": "p", "checkouts": {},
                                 "light": light})
    assert "one photo, .onnx on /venv/bin/python: 0.80 s, peak 93 MiB" in table
