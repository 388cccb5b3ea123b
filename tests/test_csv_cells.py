"""CSV formula injection: every CSV the project writes gives a spreadsheet text, never a formula, in its
text cells (file names, themes, workers, errors): a cell starting with = + - @ tab or CR gets a leading
quote (OWASP), numbers are left as they are, and the project's own readers get the text back."""
from __future__ import annotations

import csv
import io

import numpy as np
import torch
from PIL import Image

from paper import personalize as pz
import predict
from models import TANet
from report.predictions import read_predictions, write_predictions
from helpers.safe_io import csv_text_cell, csv_text_value

FORMULAS = ["=1+2", "+cmd|' /C calc'!A0", "-2+3", "@SUM(A1)", "\tcmd", "\rcmd"]
PLAIN = ["photo.jpg", "a=b.jpg", "", "été.png", "1.jpg"]


def test_a_cell_a_spreadsheet_would_run_becomes_text_and_comes_back():
    for text in FORMULAS:
        assert csv_text_cell(text) == "'" + text and csv_text_value(csv_text_cell(text)) == text
    for text in PLAIN:
        assert csv_text_cell(text) == text and csv_text_value(text) == text
    assert csv_text_cell("'quoted") == "''quoted" and csv_text_value("''quoted") == "'quoted"


def test_predict_writes_a_formula_named_image_as_text(tmp_path, monkeypatch):
    torch.manual_seed(0)
    ckpt = tmp_path / "tad66k.pth"
    torch.save({"model": TANet("tad66k").state_dict(), "variant": "tad66k"}, ckpt)
    rng = np.random.default_rng(0)
    for name in ("=1+2.jpg", "plain.jpg"):
        Image.fromarray(rng.integers(0, 256, (64, 80, 3), np.uint8), "RGB").save(tmp_path / name)
    monkeypatch.chdir(tmp_path)  # as typed: predict.py '=1+2.jpg' plain.jpg --output x.csv
    assert predict.main(["=1+2.jpg", "plain.jpg", "--path_to_model_weight", str(ckpt), "--device", "cpu",
                         "--output", "x.csv"]) == 0
    rows = list(csv.DictReader(io.StringIO((tmp_path / "x.csv").read_text(encoding="utf-8"))))
    assert sorted(r["image"] for r in rows) == ["'=1+2.jpg", "plain.jpg"], rows
    assert all(1.0 <= float(r["score"]) <= 10.0 for r in rows)


def test_test_predictions_csv_writes_names_and_themes_as_text_and_reads_them_back(tmp_path):
    names = ["=1+2.jpg", "-5.jpg", "'q.jpg", "plain.jpg"]
    themes = ["@SUM(A1)", "animal", "+x", "-"]
    path = tmp_path / "test_predictions.csv"
    write_predictions(path, names, themes, np.array([5.0, 6.0, 7.0, 4.0]), np.array([5.5, -0.5, 7.5, 4.0]))
    rows = list(csv.reader(io.StringIO(path.read_text(encoding="utf-8"))))[1:]
    assert [r[0] for r in rows] == ["'=1+2.jpg", "'-5.jpg", "''q.jpg", "plain.jpg"]
    assert [r[1] for r in rows] == ["'@SUM(A1)", "animal", "'+x", "'-"]
    assert rows[1][3] == "-0.500000"  # numbers stay numbers
    table = read_predictions(path)
    assert table.names == names and list(table.themes) == themes


def test_personalized_workers_csv_writes_worker_ids_as_text(tmp_path):
    draw = {"repeat": 0, "n_train": 4, "n_test": 6, "generic_srcc": 0.5, "finetuned_srcc": -0.25}
    records = [{"worker": w, "n_images": 10, "shots": {"4": {"draws": [draw]}}} for w in ("=HYPERLINK(1)", "A1")]
    protocol = pz.Protocol(shots=(4,), repeats=1, min_test_images=5, recipe=pz.Recipe(epochs=0))
    pz.write_outputs(tmp_path, records, protocol, {"data": "tiny", "generic": "tiny", "eval_batch_size": 8})
    rows = list(csv.DictReader(io.StringIO((tmp_path / pz.RESULTS_CSV).read_text(encoding="utf-8"))))
    assert [r["worker"] for r in rows] == ["'=HYPERLINK(1)", "A1"]
    assert rows[0]["finetuned_srcc"] == "-0.25"
