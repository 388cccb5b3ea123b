"""scoring/results.py, result_log.py and inputs.py's shards: the output formats, an output that grows and resumes
(ResultLog), shards."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from scoring.errors import ScoringError
from scoring.inputs import parse_shard, shard_of
from scoring.result_log import ResultLog, partial_rows_path, resume_state_path
from scoring.results import ScoreResult, csv_row, rank_results, write_results

REPO = Path(__file__).resolve().parents[1]
SETTINGS = {"weights": "w.pth", "amp": "none"}
AVA = [ScoreResult(f"img{i}.jpg", 5 + i / 7, 1.5 + i / 100, tuple([0.1] * 10)) for i in range(6)]
AVA[3] = ScoreResult("=broken.jpg", error="image file =broken.jpg is truncated, a quote \" and a\nnewline")
NAMES = [r.image for r in AVA]


def _read(path: Path) -> list[dict]:
    """The rows of any output format, as strings and floats."""
    if path.suffix == ".csv":  # text cells as written: a leading ' keeps a spreadsheet from running them
        with open(path, newline="", encoding="utf-8") as f:
            header, *rows = csv.reader(f)
        return [csv_row(cells, header) for cells in rows]
    if path.suffix == ".jsonl":  # FILE.partial.jsonl too
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    if path.suffix == ".json":
        return json.loads(path.read_text(encoding="utf-8"))
    pq = pytest.importorskip("pyarrow.parquet")
    return pq.read_table(path).to_pylist()


def _log(path: Path, results, resume: bool, variant: str = "ava", **kw) -> ResultLog:
    log = ResultLog(path, variant, **kw)
    log.open(settings=SETTINGS, images=NAMES[:len(AVA)], resume=resume)
    return log


@pytest.mark.parametrize("suffix", [".csv", ".json", ".jsonl", ".parquet"])
def test_a_stopped_run_resumes_into_the_file_an_uninterrupted_run_writes(tmp_path, suffix):
    if suffix == ".parquet":
        pytest.importorskip("pyarrow")
    whole = tmp_path / f"whole{suffix}"
    write_results(AVA, whole, "ava")
    out = tmp_path / f"out{suffix}"
    log = _log(out, AVA, resume=False, flush_rows=1)
    for r in AVA[:4]:
        log.add(r)
    log.close()  # as a kill after the 4th row's sync
    assert resume_state_path(out).exists()
    grown = _read(out) if suffix in (".csv", ".jsonl") else _read(partial_rows_path(out))  # JSON Lines
    assert [row["image"] for row in grown] == NAMES[:4]
    log = _log(out, AVA, resume=True)
    assert log.done == 4
    for r in AVA[log.done:]:
        log.add(r)
    log.finish()
    assert out.read_bytes() == whole.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([whole.name, out.name])  # no run files left


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
@pytest.mark.parametrize("cut", [1, 7, 25])
def test_a_row_cut_by_a_kill_is_dropped_on_resume(tmp_path, suffix, cut):
    out = tmp_path / f"out{suffix}"
    log = _log(out, AVA, resume=False)
    for r in AVA[:4]:  # row 3 holds a quote and a newline inside its quoted cell
        log.add(r)
    log.close()
    data = out.read_bytes()
    out.write_bytes(data[:-cut])  # the last row, cut
    log = _log(out, AVA, resume=True)
    assert log.done == 3
    for r in AVA[3:]:
        log.add(r)
    log.finish()
    whole = tmp_path / f"whole{suffix}"
    write_results(AVA, whole, "ava")
    assert out.read_bytes() == whole.read_bytes()


def test_the_growing_file_is_valid_up_to_its_last_row(tmp_path):
    out = tmp_path / "out.csv"
    log = _log(out, AVA, resume=False, flush_rows=2)
    for k, r in enumerate(AVA[:5], start=1):
        log.add(r)
        synced = _read(out)  # what a reader (or a kill) sees now
        assert len(synced) == k - k % 2
        assert [row["image"] for row in synced] == NAMES[:len(synced)]
    log.close()


def test_ranked_outputs_are_written_at_the_end(tmp_path):
    out = tmp_path / "out.csv"
    log = _log(out, AVA, resume=False)
    for r in AVA:
        log.add(r)
    results = list(log.results())
    assert results == AVA  # read back exactly
    ranked = rank_results(results, top=2)
    log.finish(ranked)
    assert [row["image"] for row in _read(out)] == ["img5.jpg", "img4.jpg"]
    assert not resume_state_path(out).exists()


def test_a_run_stopped_while_writing_its_final_file_completes_on_resume(tmp_path, monkeypatch):
    out = tmp_path / "out.json"
    log = _log(out, AVA, resume=False)
    for r in AVA:
        log.add(r)
    from scoring import result_log
    real_replace = result_log.os.replace

    def replace(src, dst):
        if Path(dst) == out:
            raise KeyboardInterrupt  # stopped between the final file's write and its rename
        real_replace(src, dst)

    monkeypatch.setattr(result_log.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        log.finish(rank_results(AVA, sort="desc"))
    monkeypatch.undo()
    log = _log(out, AVA, resume=True)
    assert log.complete and not resume_state_path(out).exists() and not partial_rows_path(out).exists()
    assert [row["image"] for row in _read(out)][:2] == ["img5.jpg", "img4.jpg"]


def test_an_unfinished_run_is_refused_without_resume_and_with_other_settings(tmp_path):
    out = tmp_path / "out.csv"
    log = _log(out, AVA, resume=False)
    log.add(AVA[0])
    log.close()
    with pytest.raises(ScoringError, match=r"did not finish; continue it with: python predict\.py x --resume"):
        ResultLog.refuse_unfinished(out, "python predict.py x --resume")
    with pytest.raises(ScoringError, match=r"amp \('none' then, 'bf16' now\)"):
        ResultLog(out, "ava").open(settings={**SETTINGS, "amp": "bf16"}, images=NAMES, resume=True)
    with pytest.raises(ScoringError, match="the images"):
        ResultLog(out, "ava").open(settings=SETTINGS, images=NAMES[:-1], resume=True)
    with pytest.raises(ScoringError, match="variant"):
        ResultLog(out, "tad66k").open(settings=SETTINGS, images=NAMES, resume=True)
    assert len(_read(out)) == 1  # nothing lost


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_jsonl_and_parquet_outputs(tmp_path, suffix):
    if suffix == ".parquet":
        pytest.importorskip("pyarrow")
    out = tmp_path / f"out{suffix}"
    write_results(AVA, out, "ava")
    rows = _read(out)
    assert [r["image"] for r in rows] == NAMES
    assert rows[3]["score"] is None and rows[3]["p1"] is None and "newline" in rows[3]["error"]
    assert rows[0]["score"] == AVA[0].score and rows[0]["p10"] == 0.1 and rows[0]["error"] == ""


def test_parquet_without_pyarrow_names_the_requirements_file(tmp_path):
    code = ("import sys; sys.modules['pyarrow'] = None; sys.modules['pyarrow.parquet'] = None\n"
            "from scoring.results import check_output_path\n"
            "try:\n    check_output_path('out.parquet')\nexcept ValueError as e:\n    print(e)\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert "needs pyarrow; install it with pip install -r requirements-scale.txt" in done.stdout, done.stderr


def test_shards_are_deterministic_disjoint_and_covering():
    keys = [f"sub/{i:05d}.jpg" for i in range(2000)]
    parts = [[k for k in keys if shard_of(k, 4) == i] for i in range(4)]
    assert sorted(sum(parts, [])) == keys and all(350 < len(p) < 650 for p in parts)
    assert shard_of("sub/00001.jpg", 4) == shard_of(Path("sub") / "00001.jpg", 4)
    # the hash of the POSIX path: the same on every machine and Python version
    assert [shard_of(f"{i}.jpg", 1000) for i in range(3)] == [514, 406, 840]
    assert parse_shard("2/4") == (2, 4)
    for bad in ("4/4", "-1/4", "1", "a/b", "0/0"):
        with pytest.raises(ValueError, match="0 <= I < N"):
            parse_shard(bad)


def test_result_modules_import_no_torch():
    """The torch-free scoring path finds its images and writes its results with these modules."""
    code = "import sys, scoring.inputs, scoring.results, scoring.result_log; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "False", done.stderr
