"""predict.py --engine ray (ray_scoring.py): the same scores as the local engine on a local Ray, errors per
image, --resume and --shard; a clear error without Ray."""
from __future__ import annotations

import csv
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import predict
from models import TANet

QUIET = ["--num_workers", "0", "--quiet", "--device", "cpu"]


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray")
    torch.manual_seed(0)
    torch.save({"model": TANet("ava").state_dict(), "variant": "ava"}, root / "ava.pth")
    (root / "photos").mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(root / "photos" / f"p{i}.jpg")
    (root / "photos" / "broken.jpg").write_bytes(b"no image")
    return root


def _rows(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_engine_ray_without_ray_names_the_requirements_file(collection, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails
    monkeypatch.setitem(sys.modules, "ray.data", None)
    status = predict.main([str(collection / "photos"), "--path_to_model_weight", str(collection / "ava.pth"),
                           "--engine", "ray", *QUIET])
    assert status == 2
    assert "--engine ray needs Ray Data: pip install -r requirements-scale.txt" in capsys.readouterr().err


@pytest.mark.slow  # a local Ray starts in 10-30 s on 2 cores
def test_ray_scores_as_the_local_engine_and_resumes_and_shards(collection, tmp_path, monkeypatch, capsys):
    pytest.importorskip("ray.data")
    import ray

    from scoring import Scorer

    args = [str(collection / "photos"), "--path_to_model_weight", str(collection / "ava.pth"), "--batch_size", "2",
            *QUIET]
    local, remote = tmp_path / "local.csv", tmp_path / "ray.csv"
    try:
        assert predict.main([*args, "--output", str(local)]) == 1  # the broken image
        assert predict.main([*args, "--output", str(remote), "--engine", "ray"]) == 1
        ours, theirs = _rows(remote), _rows(local)
        assert [r["image"] for r in ours] == [r["image"] for r in theirs] and len(ours) == 7
        for a, b in zip(ours, theirs):
            assert a["error"] == b["error"]
            for column in ("score", "std", *(f"p{k}" for k in range(1, 11))):
                assert (a[column] == b[column] == "") or abs(float(a[column]) - float(b[column])) < 1e-5
        assert "broken.jpg" in ours[0]["error"] and ours[0]["score"] == ""
        # a local run stopped after 3 images, resumed on Ray
        real = Scorer.iter_results

        def stopped(self, sources, **kw):
            for k, result in enumerate(real(self, sources, **kw)):
                if k == 3:
                    raise KeyboardInterrupt
                yield result

        monkeypatch.setattr(Scorer, "iter_results", stopped)
        resumed = tmp_path / "resumed.csv"
        assert predict.main([*args, "--output", str(resumed)]) == predict.EXIT_INTERRUPTED
        monkeypatch.undo()
        assert predict.main([*args, "--output", str(resumed), "--engine", "ray", "--resume"]) == 1
        assert "resuming" in capsys.readouterr().err
        assert [r["image"] for r in _rows(resumed)] == [r["image"] for r in theirs]
        # a shard on Ray is the local engine's shard
        for engine, out in (("local", tmp_path / "s_local.csv"), ("ray", tmp_path / "s_ray.csv")):
            predict.main([*args, "--output", str(out), "--shard", "1/2", "--engine", engine])
        ray_rows, local_rows = _rows(tmp_path / "s_ray.csv"), _rows(tmp_path / "s_local.csv")
        assert [r["image"] for r in ray_rows] == [r["image"] for r in local_rows]
    finally:
        ray.shutdown()
