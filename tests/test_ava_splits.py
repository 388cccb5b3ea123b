"""tools/make_ava_splits.py on a small fake AVA.txt."""
from __future__ import annotations

import importlib.util
import re
import runpy
import sys
from pathlib import Path

import pandas as pd
import pytest

from dataset import read_ava_csv

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "make_ava_splits.py"
HEADER = "image_id,score2,score3,score4,score5,score6,score7,score8,score9,score10,score11,tag1,tag2,tag3\n"


def load_tool():
    spec = importlib.util.spec_from_file_location("make_ava_splits", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tool = load_tool()


def ava_line(index, image_id, votes, tags=(1, 2), challenge=100):
    return " ".join(str(v) for v in (index, image_id, *votes, *tags, challenge))


def make_fake_ava(tmp_path):
    """AVA.txt with ids 1..12 (id 9 has no votes), test = {3, 7}, val = {5}."""
    lines = []
    for k, image_id in enumerate([12, 3, 1, 10, 5, 7, 2, 11, 9, 4, 8, 6], 1):
        votes = [0] * 10 if image_id == 9 else [image_id % 3, 1, 2, 3, 4, 5, 4, 3, 2, image_id]
        lines.append(ava_line(k, image_id, votes, tags=(image_id % 5, 0), challenge=1000 + image_id))
    ava_txt = tmp_path / "AVA.txt"
    ava_txt.write_text("\n".join(lines) + "\n")
    ref = tmp_path / "ref"
    ref.mkdir(exist_ok=True)
    (ref / "test.csv").write_text(HEADER + "3,0,1,2,3,4,5,4,3,2,3,3,0,1003\n7,1,1,2,3,4,5,4,3,2,7,2,0,1007\n")
    (ref / "val.csv").write_text(HEADER + "5,2,1,2,3,4,5,4,3,2,5,0,0,1005\n\n")
    return ava_txt, ref


def run(tmp_path, *extra, out="out"):
    ava_txt, ref = make_fake_ava(tmp_path)
    code = tool.main(["--ava_txt", str(ava_txt), "--test_csv", str(ref / "test.csv"), "--val_csv",
                      str(ref / "val.csv"), "--out_dir", str(tmp_path / out), *map(str, extra)])
    return code, tmp_path / out


def test_train_is_everything_else_sorted_by_id(tmp_path, capsys):
    code, out = run(tmp_path)
    assert code == 0
    train = read_ava_csv(out / "train.csv")
    assert train["image_id"].tolist() == ["1", "2", "4", "6", "8", "10", "11", "12"]  # no 3/7 (test), 5 (val), 9
    row = train.set_index("image_id").loc["10"]
    assert row[[f"score{i}" for i in range(2, 12)]].tolist() == [1, 1, 2, 3, 4, 5, 4, 3, 2, 10]
    assert row[["tag1", "tag2", "tag3"]].tolist() == [0, 0, 1010]  # tag3 is the challenge id
    assert (out / "train.csv").read_text().splitlines()[0] + "\n" == HEADER
    text = capsys.readouterr().out
    assert "8 images" in text and "3 in test/val" in text and "1 without votes" in text
    assert "differ; 0 image(s) in both" in text


def test_test_and_val_are_copied_unchanged(tmp_path):
    code, out = run(tmp_path)
    assert code == 0
    assert (out / "test.csv").read_bytes() == (tmp_path / "ref" / "test.csv").read_bytes()
    assert (out / "val.csv").read_bytes() == (tmp_path / "ref" / "val.csv").read_bytes()
    assert sorted(p.name for p in out.iterdir()) == ["test.csv", "train.csv", "val.csv"]  # no temp files


def test_output_is_deterministic(tmp_path):
    run(tmp_path, out="a")
    run(tmp_path, out="b")
    assert (tmp_path / "a" / "train.csv").read_bytes() == (tmp_path / "b" / "train.csv").read_bytes()


def test_exclude_list_and_missing_images(tmp_path, capsys):
    (tmp_path / "bad_ids.txt").write_text("# known corrupt\n2, 4.jpg\n")
    images = tmp_path / "images"
    images.mkdir()
    for i in (1, 2, 6, 8, 10, 11):
        (images / f"{i}.jpg").write_bytes(b"x")
    code, out = run(tmp_path, "--exclude", tmp_path / "bad_ids.txt", "--image_dir", images)
    assert code == 0
    assert read_ava_csv(out / "train.csv")["image_id"].tolist() == ["1", "6", "8", "10", "11"]
    text = capsys.readouterr().out
    assert "2 excluded" in text and "1 missing from --image_dir" in text


def test_identical_val_and_test_are_reported(tmp_path):
    _, ref = make_fake_ava(tmp_path)
    test = read_ava_csv(ref / "test.csv")
    assert "identical files" in tool.compare_val_test(ref / "test.csv", ref / "test.csv", test, test)


@pytest.mark.parametrize("line, match", [
    ("1 5 1 2 3", "line 2 has 5 fields"),
    ("1 5 1 2 3 4 5 6 7 8 9 x 1 2 3", "line 2 has a non-integer field"),
    ("1 5 1 2 3 4 5 6 7 8 9 -1 1 2 3", "line 2 .*negative vote count"),
    ("1 12 1 2 3 4 5 6 7 8 9 1 1 2 3", "image 12 is listed twice"),
])
def test_bad_ava_txt_is_reported(tmp_path, capsys, line, match):
    ava_txt, ref = make_fake_ava(tmp_path)
    first = ava_txt.read_text().splitlines()[0]
    ava_txt.write_text(first + "\n" + line + "\n")
    code = tool.main(["--ava_txt", str(ava_txt), "--test_csv", str(ref / "test.csv"), "--val_csv",
                      str(ref / "val.csv"), "--out_dir", str(tmp_path / "out")])
    assert code == 2
    assert re.search(match, capsys.readouterr().err)
    assert not (tmp_path / "out" / "train.csv").exists()


def test_missing_inputs_are_reported(tmp_path, capsys):
    _, ref = make_fake_ava(tmp_path)
    assert tool.main(["--ava_txt", str(tmp_path / "none.txt"), "--test_csv", str(ref / "test.csv"),
                      "--val_csv", str(ref / "val.csv"), "--out_dir", str(tmp_path / "o")]) == 2
    assert "none.txt not found" in capsys.readouterr().err


def test_shipped_val_and_test_differ():
    val, test = read_ava_csv(REPO / "data" / "AVA" / "val.csv"), read_ava_csv(REPO / "data" / "AVA" / "test.csv")
    message = tool.compare_val_test(REPO / "data" / "AVA" / "val.csv", REPO / "data" / "AVA" / "test.csv", val, test)
    assert message == "val.csv (12775 images) and test.csv (12776 images) differ; 0 image(s) in both"


def test_runs_as_a_script(tmp_path, monkeypatch):
    ava_txt, ref = make_fake_ava(tmp_path)
    monkeypatch.setattr(sys, "argv", [str(TOOL), "--ava_txt", str(ava_txt), "--test_csv", str(ref / "test.csv"),
                                      "--val_csv", str(ref / "val.csv"), "--out_dir", str(tmp_path / "cli")])
    with pytest.raises(SystemExit) as info:
        runpy.run_path(str(TOOL), run_name="__main__")
    assert info.value.code == 0
    assert len(pd.read_csv(tmp_path / "cli" / "train.csv")) == 8
