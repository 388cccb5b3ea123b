"""predict.py: the command line (inputs, weights, outputs, exit statuses) on tiny checkpoints and images."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import predict
from models import TANet
from models import get_pretrained_cfg
from scoring import Scorer

RELEASED = {v: get_pretrained_cfg(v).weight_file for v in ("tad66k", "ava")}  # the released weight files

REPO = Path(__file__).resolve().parent.parent
QUIET = ["--num_workers", "0", "--quiet", "--device", "cpu"]


def _pixels(seed, size=(36, 24)):
    rng = np.random.default_rng(seed)
    w, h = size
    return np.clip(rng.integers(0, 256, 3) + rng.integers(-60, 60, (h, w, 3)), 0, 255).astype(np.uint8)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    torch.save(TANet("tad66k").state_dict(), root / "tad66k.pth")
    ava = TANet("ava").state_dict()
    torch.save(ava, root / "ava.pth")
    torch.save({"model": ava, "variant": "ava", "epoch": 1}, root / "ava_training.pth")
    return root


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Three distinct small JPEGs in a folder."""
    root = tmp_path_factory.mktemp("photos")
    for i, name in enumerate(("a.jpg", "b.jpg", "c.jpg")):
        Image.fromarray(_pixels(10 + i, (40 + 5 * i, 30)), "RGB").save(root / name)
    return root


@pytest.fixture(scope="module")
def reference(ckpts, photos):
    """Each photo's score from the API, alone in its batch."""
    scorer = Scorer(ckpts / "tad66k.pth", device="cpu", batch_size=1)
    return {r.image: r.score for r in scorer.score_detailed(sorted(str(p) for p in photos.iterdir()))}


def _mixed_folder(root: Path) -> tuple[list[str], list[str]]:
    """Images of many formats and modes, and broken files; returns (good, bad) names."""
    root.mkdir()
    rgb = _pixels(1, (40, 30))
    Image.fromarray(rgb, "RGB").save(root / "01_rgb.jpg")
    rgba = np.dstack([_pixels(2, (40, 30)), np.full((30, 40), 120, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(root / "02_alpha.png")
    Image.fromarray(_pixels(3, (40, 30))[..., 0], "L").save(root / "03_gray.png")
    Image.fromarray(_pixels(4, (40, 30)), "RGB").convert("CMYK").save(root / "04_cmyk.jpg")
    Image.fromarray(np.arange(1200, dtype=np.uint16).reshape(30, 40) * 50).save(root / "05_16bit.png")
    Image.fromarray(_pixels(5, (40, 30)), "RGB").save(root / "06_upper.BMP")
    full = (root / "01_rgb.jpg").read_bytes()
    (root / "07_truncated.jpg").write_bytes(full[: len(full) // 2])
    (root / "08_random.jpg").write_bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes())
    (root / "09_empty.png").write_bytes(b"")
    (root / "readme.txt.bak").write_text("not listed")
    return (["01_rgb.jpg", "02_alpha.png", "03_gray.png", "04_cmyk.jpg", "05_16bit.png", "06_upper.BMP"],
            ["07_truncated.jpg", "08_random.jpg", "09_empty.png"])


@pytest.mark.slow
def test_command_line_interface_writes_csv(ckpts, photos, reference, tmp_path):
    paths = sorted(str(p) for p in photos.iterdir())
    out = tmp_path / "scores.csv"
    done = subprocess.run(
        [sys.executable, str(REPO / "predict.py"), *paths, "--path_to_model_weight", str(ckpts / "tad66k.pth"),
         "--variant", "tad66k", "--batch_size", "2", "--output", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""},  # CPU, one thread, as in-process
    )
    assert done.returncode == 0, done.stderr
    with open(out, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [r["image"] for r in rows] == paths
    assert list(rows[0]) == ["image", "score", "error"]
    assert all(r["error"] == "" and abs(float(r["score"]) - reference[r["image"]]) < 1e-5 for r in rows)
    assert done.stdout.splitlines()[0].split() == ["image", "score", "error"]
    assert all(Path(p).name in done.stdout for p in paths)


def test_mixed_formats_and_broken_files(ckpts, tmp_path, capsys):
    good, bad = _mixed_folder(tmp_path / "mixed")
    missing = str(tmp_path / "not_there.jpg")
    out = tmp_path / "scores.json"
    status = predict.main([str(tmp_path / "mixed"), missing, "--path_to_model_weight", str(ckpts / "tad66k.pth"),
                           "--output", str(out), *QUIET])
    assert status == 1
    rows = json.loads(out.read_text(encoding="utf-8"))
    assert [Path(r["image"]).name for r in rows] == sorted(good + bad) + ["not_there.jpg"]
    for row in rows:
        if Path(row["image"]).name in good:
            assert row["error"] == "" and 1.0 <= row["score"] <= 10.0, row
        else:
            assert row["score"] is None and Path(row["image"]).name in row["error"], row
    err = capsys.readouterr().err
    assert all(f"failed: image file {tmp_path / 'mixed' / name}" in err for name in bad)
    assert "not_there.jpg not found" in err and "scored 6 of 10 images; 4 failed" in err


def test_ava_csv_with_the_variant_from_a_training_checkpoint(ckpts, photos, tmp_path, capsys):
    out = tmp_path / "ava.csv"
    status = predict.main([str(photos), "--path_to_model_weight", str(ckpts / "ava_training.pth"),
                           "--output", str(out), "--batch_size", "2", *QUIET])
    assert status == 0
    with open(out, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["image", "score", "std", *(f"p{k}" for k in range(1, 11)), "error"]
    for row in rows:
        dist = np.array([float(row[f"p{k}"]) for k in range(1, 11)])
        assert abs(dist.sum() - 1) < 1e-5 and float(row["score"]) == pytest.approx(dist @ np.arange(1, 11))
        assert float(row["std"]) > 0 and row["error"] == ""
    assert capsys.readouterr().out.splitlines()[0].split() == ["image", "score", "std", "error"]


@pytest.mark.parametrize("options, expect", [
    (["--sort", "desc"], lambda names: names),
    (["--sort", "asc"], lambda names: names[::-1]),
    (["--top", "2"], lambda names: names[:2]),
    (["--bottom", "1"], lambda names: names[-1:]),
])
def test_sort_top_bottom_and_batch_size_independence(ckpts, photos, reference, tmp_path, options, expect):
    out = tmp_path / "out.json"
    status = predict.main([str(photos), "--path_to_model_weight", str(ckpts / "tad66k.pth"), "--output", str(out),
                           "--batch_size", "2", *options, *QUIET])
    assert status == 0
    rows = json.loads(out.read_text(encoding="utf-8"))
    best_first = sorted(reference, key=lambda k: -reference[k])
    assert [r["image"] for r in rows] == expect(best_first)
    assert all(abs(r["score"] - reference[r["image"]]) < 1e-5 for r in rows)


def test_text_and_csv_lists(ckpts, photos, reference, tmp_path):
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "picks.txt").write_text(f"# favourites\nb.jpg\n\n{photos / 'a.jpg'}\n", encoding="utf-8")
    (lists / "more.csv").write_text("image,theme\nc.jpg,sea\n", encoding="utf-8")
    out = tmp_path / "out.json"
    status = predict.main([str(lists / "picks.txt"), str(lists / "more.csv"), "--path_to_images", str(photos),
                           "--path_to_model_weight", str(ckpts / "tad66k.pth"), "--output", str(out), *QUIET])
    assert status == 0
    rows = json.loads(out.read_text(encoding="utf-8"))
    assert [r["image"] for r in rows] == [str(photos / name) for name in ("b.jpg", "a.jpg", "c.jpg")]
    assert all(abs(r["score"] - reference[r["image"]]) < 1e-5 for r in rows)
    # without --path_to_images, entries are relative to the list's folder
    (tmp_path / "up.csv").write_text(f"image\n{os.path.relpath(photos / 'c.jpg', tmp_path)}\n", encoding="utf-8")
    status = predict.main([str(lists / "picks.txt"), str(tmp_path / "up.csv"),
                           "--path_to_model_weight", str(ckpts / "tad66k.pth"), "--output", str(out), *QUIET])
    assert status == 1
    rows = json.loads(out.read_text(encoding="utf-8"))
    assert rows[0]["image"] == str(lists / "b.jpg") and "not found" in rows[0]["error"]
    assert [Path(r["image"]).resolve() for r in rows[1:]] == [photos / "a.jpg", photos / "c.jpg"]
    assert all(abs(r["score"] - reference[str(Path(r["image"]).resolve())]) < 1e-5 for r in rows[1:])


def test_missing_weights_say_how_to_get_them(photos, capsys):
    assert predict.main([str(photos)]) == 2
    err = capsys.readouterr().err
    assert all(text in err for text in (RELEASED["tad66k"], RELEASED["ava"], "--download", "main_nni.py"))


@pytest.mark.parametrize("options, message", [
    (["--path_to_model_weight", "{ava}", "--variant", "tad66k"], "is a 'ava' model, but variant 'tad66k'"),
    (["--path_to_model_weight", "nope.pth"], "weight file 'nope.pth' not found"),
    (["--path_to_model_weight", RELEASED["ava"], "--checkpoints_dir", "{empty}"], "--download"),
    (["--path_to_model_weight", "{tad}", "--output", "{tmp}/out.xlsx"], "use a .csv, .json, .jsonl"),
    (["--path_to_model_weight", "{tad}", "--amp", "fp16", "--device", "cpu"], "fp16 needs a CUDA device"),
    (["--path_to_model_weight", "{tad}", "--device", "tpu"], "is not a device"),
])
def test_usage_errors_exit_2(ckpts, photos, tmp_path, capsys, options, message):
    (tmp_path / "empty").mkdir()
    fill = {"ava": ckpts / "ava.pth", "tad": ckpts / "tad66k.pth", "empty": tmp_path / "empty", "tmp": tmp_path}
    status = predict.main([str(photos), *QUIET, *(o.format(**fill) for o in options)])  # options win
    assert status == 2
    err = capsys.readouterr().err
    assert err.startswith("predict.py: error:") and message in err
    assert not (tmp_path / "out.xlsx").exists()


def test_nothing_to_score_exit_2(ckpts, tmp_path, capsys):
    assert predict.main([str(tmp_path), "--path_to_model_weight", str(ckpts / "tad66k.pth"), *QUIET]) == 2
    err = capsys.readouterr().err
    assert "warning: folder" in err and "no images found" in err


@pytest.mark.parametrize("argv", [["x.jpg", "--top", "0"], ["x.jpg", "--top", "1", "--bottom", "1"],
                                  ["x.jpg", "--batch_size", "0"], ["x.jpg", "--sort", "random"],
                                  ["x.jpg", "--threads", "0"], []])
def test_bad_options_are_argparse_errors(argv):
    with pytest.raises(SystemExit) as info:
        predict.main(argv)
    assert info.value.code == 2


def test_batch_fusion_warns_on_stderr(ckpts, photos, capsys):
    status = predict.main([str(photos / "a.jpg"), "--path_to_model_weight", str(ckpts / "tad66k.pth"),
                           "--theme_fusion", "batch", "--threads", "1", *QUIET])
    assert status == 0
    captured = capsys.readouterr()
    assert "predict.py: warning:" in captured.err and "depends on the other images of its batch" in captured.err
    assert "a.jpg" in captured.out


def test_unwritable_output_is_an_error(ckpts, photos, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    status = predict.main([str(photos / "a.jpg"), "--path_to_model_weight", str(ckpts / "tad66k.pth"),
                           "--output", str(tmp_path / "file" / "out.csv"), *QUIET])
    assert status == 2
    assert "cannot write" in capsys.readouterr().err
    assert (tmp_path / "file").read_text() == "x"


@pytest.mark.parametrize("allocator,calls", [("tuned", 1), ("system", 0)])
def test_allocator_option(ckpts, photos, monkeypatch, allocator, calls):
    seen = []
    monkeypatch.setattr(predict, "tune_cpu_allocator", lambda: seen.append(1) or True)
    image = str(sorted(photos.iterdir())[0])
    assert predict.main([image, "--path_to_model_weight", str(ckpts / "tad66k.pth"), "--variant", "tad66k",
                         "--device", "cpu", "--num_workers", "0", "--quiet", "--allocator", allocator]) == 0
    assert len(seen) == calls


# --------------------------------------------------------------------------- resume, shards, formats

@pytest.fixture(scope="module")
def library(tmp_path_factory):
    """Seven small JPEGs in two folders levels, and a broken one."""
    root = tmp_path_factory.mktemp("library")
    (root / "sub").mkdir()
    for i in range(7):
        Image.fromarray(_pixels(30 + i, (32, 28)), "RGB").save(root / ("sub" if i % 2 else ".") / f"p{i}.jpg")
    (root / "broken.jpg").write_bytes(b"not a jpeg")
    return root


def _lib_args(ckpts, library, out, *more):
    return [str(library), "--recursive", "--path_to_model_weight", str(ckpts / "ava.pth"), "--output", str(out),
            "--batch_size", "2", *QUIET, *more]


def _stop_after(monkeypatch, n, seen):
    """Scorer.iter_results records the images it is given and is interrupted (Ctrl-C) after n results."""
    real = Scorer.iter_results

    def iter_results(self, sources, **kw):
        seen.extend(str(s) for s in sources)
        for k, result in enumerate(real(self, sources, **kw)):
            if k == n:
                raise KeyboardInterrupt
            yield result

    monkeypatch.setattr(Scorer, "iter_results", iter_results)


@pytest.mark.parametrize("suffix, options", [(".csv", []), (".json", ["--sort", "desc"]), (".jsonl", ["--top", "3"])])
def test_an_interrupted_run_resumes_without_scoring_an_image_twice(ckpts, library, tmp_path, monkeypatch, capsys,
                                                                   suffix, options):
    whole = tmp_path / f"whole{suffix}"
    assert predict.main(_lib_args(ckpts, library, whole, *options)) == 1  # the broken image fails
    out = tmp_path / f"out{suffix}"
    seen: list[str] = []
    _stop_after(monkeypatch, 5, seen)
    assert predict.main(_lib_args(ckpts, library, out, *options)) == predict.EXIT_INTERRUPTED
    assert "continue with: python predict.py" in capsys.readouterr().err
    monkeypatch.undo()
    # without --resume: refused, with the command that continues it; nothing lost
    before = out.read_bytes() if out.exists() else None
    assert predict.main(_lib_args(ckpts, library, out, *options)) == 2
    err = capsys.readouterr().err
    assert "did not finish; continue it with: python predict.py" in err and err.rstrip().count("--resume") == 1
    assert (out.read_bytes() if out.exists() else None) == before
    _stop_after(monkeypatch, 99, seen)
    assert predict.main(_lib_args(ckpts, library, out, *options, "--resume")) == 1
    assert "resuming" in capsys.readouterr().err
    assert len(seen) == 8 + 3 and sorted(set(seen)) == sorted(seen[:8])  # the 5 scored before are not again
    assert seen[8:] == seen[5:8]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([whole.name, out.name])
    if suffix == ".csv":
        assert out.read_bytes() == whole.read_bytes()
    else:
        text = out.read_text()
        ours = [json.loads(x) for x in text.splitlines()] if suffix == ".jsonl" else json.loads(text)
        theirs = ([json.loads(x) for x in whole.read_text().splitlines()] if suffix == ".jsonl"
                  else json.loads(whole.read_text()))
        assert [r["image"] for r in ours] == [r["image"] for r in theirs]
        assert len(ours) == (3 if options[0] == "--top" else 8)
        assert all(a["score"] == pytest.approx(b["score"], abs=1e-5) or a["score"] is b["score"] is None
                   for a, b in zip(ours, theirs))


def test_resume_with_other_options_is_refused(ckpts, library, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out.csv"
    _stop_after(monkeypatch, 3, [])
    assert predict.main(_lib_args(ckpts, library, out)) == predict.EXIT_INTERRUPTED
    monkeypatch.undo()
    assert predict.main(_lib_args(ckpts, library, out, "--draft", "--resume")) == 2
    assert "draft (False then, True now)" in capsys.readouterr().err
    assert predict.main([str(library), "--path_to_model_weight", str(ckpts / "ava.pth"), "--resume", *QUIET]) == 2
    assert "--resume continues the run that writes --output" in capsys.readouterr().err


def test_shards_split_a_collection_and_merge_back(ckpts, library, tmp_path):
    whole = tmp_path / "whole.csv"
    predict.main(_lib_args(ckpts, library, whole))
    parts = []
    for i in range(3):
        status = predict.main(_lib_args(ckpts, library, tmp_path / f"part{i}.csv", "--shard", f"{i}/3"))
        assert status in (0, 1, 2)  # a shard may hold no image, or only the broken one
        if (tmp_path / f"part{i}.csv").exists():
            with open(tmp_path / f"part{i}.csv", newline="", encoding="utf-8") as f:
                parts.append(list(csv.DictReader(f)))
    with open(whole, newline="", encoding="utf-8") as f:
        everything = {r["image"]: r for r in csv.DictReader(f)}
    merged = [r for part in parts for r in part]
    assert sorted(r["image"] for r in merged) == sorted(everything)  # disjoint and covering
    assert all(abs(float(r["score"] or 0) - float(everything[r["image"]]["score"] or 0)) < 1e-5 for r in merged)
    again = tmp_path / "again.csv"
    predict.main(_lib_args(ckpts, library, again, "--shard", "1/3"))
    assert again.read_bytes() == (tmp_path / "part1.csv").read_bytes()  # deterministic
    # README's merge command
    subprocess.run("(head -n 1 part0.csv; tail -q -n +2 part*.csv) > all.csv", shell=True, cwd=tmp_path, check=True)
    with open(tmp_path / "all.csv", newline="", encoding="utf-8") as f:
        assert sorted(r["image"] for r in csv.DictReader(f)) == sorted(everything)


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_jsonl_and_parquet_outputs_by_extension(ckpts, photos, reference, tmp_path, suffix):
    if suffix == ".parquet":
        pq = pytest.importorskip("pyarrow.parquet")
    out = tmp_path / f"scores{suffix}"
    assert predict.main([str(photos), "--path_to_model_weight", str(ckpts / "tad66k.pth"), "--output", str(out),
                         *QUIET]) == 0
    rows = (pq.read_table(out).to_pylist() if suffix == ".parquet"
            else [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()])
    assert [list(r) for r in rows] == [["image", "score", "error"]] * 3
    assert all(abs(r["score"] - reference[r["image"]]) < 1e-5 and r["error"] == "" for r in rows)
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]


@pytest.mark.slow
def test_a_sigkilled_run_resumes_to_the_uninterrupted_file(ckpts, tmp_path):
    """predict.py killed with SIGKILL mid-run (rows on disk, one maybe cut), then --resume."""
    import signal
    import time

    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(120):
        Image.fromarray(_pixels(100 + i, (32, 32)), "RGB").save(folder / f"m{i:03d}.jpg")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}

    def command(out, *more):
        return [sys.executable, str(REPO / "predict.py"), str(folder),
                "--path_to_model_weight", str(ckpts / "tad66k.pth"),
                "--output", str(out), "--batch_size", "4", "--threads", "1", *QUIET, *more]

    whole = tmp_path / "whole.csv"
    subprocess.run(command(whole), cwd=REPO, env=env, capture_output=True, timeout=600, check=True)
    out = tmp_path / "out.csv"
    proc = subprocess.Popen(command(out), cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and (not out.exists() or out.read_text().count("\n") < 20):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    scored = out.read_text().count("\n") - 1
    assert 20 <= scored < 120, scored  # killed mid-run
    done = subprocess.run(command(out, "--resume"), cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert f"resuming {out}: " in done.stderr
    with open(out, newline="") as f, open(whole, newline="") as g:
        ours, theirs = list(csv.reader(f)), list(csv.reader(g))
    assert [r[0] for r in ours] == [r[0] for r in theirs] and len(ours) == 121
    assert all(abs(float(a[1]) - float(b[1])) < 1e-5 for a, b in zip(ours[1:], theirs[1:]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["many", "out.csv", "whole.csv"]
