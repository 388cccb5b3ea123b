"""tools/quickstart_table.py: the table of quick starts reads finished runs again instead of rerunning them,
and says whether the goal (every test SRCC >= 0.70, spread <= 0.03) is met."""
from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("quickstart_table", REPO / "tools" / "quickstart_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def finished_run(folder: Path, srcc: float, seconds: float) -> None:
    folder.mkdir(parents=True)
    history = [{"epoch": 1, "val_srcc": 0.1}, {"epoch": 2, "val_srcc": srcc}]
    (folder / "results.json").write_text(json.dumps({"srcc": srcc, "plcc": srcc - 0.01, "precision": "float32",
                                                     "history": history}))
    (folder / "quickstart_wall.json").write_text(json.dumps({"wall_s": seconds, "resumed": False}))


def test_finished_runs_are_read_not_rerun_and_the_goal_is_judged(tool, tmp_path, monkeypatch, capsys):
    finished_run(tmp_path / "none-seed0", 0.76, 930)
    finished_run(tmp_path / "none-seed1", 0.74, 960)
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("a finished run was run again"))
    assert tool.main(["--amps", "none", "--seeds", "0", "1", "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "| float32 | 0 | 0.7600 | 0.7500 | 0.100, 0.760 | 15.5 |" in text
    assert "spread 0.0200: meets the goal" in text
    assert (tmp_path / "table.md").read_text() == text
    assert [r["seed"] for r in json.loads((tmp_path / "table.json").read_text())["rows"]] == [0, 1]


def test_a_spread_beyond_the_goal_misses_it(tool):
    rows = [{"precision": "float32", "seed": s, "test_srcc": v, "test_plcc": v, "val_srcc_by_epoch": [v],
             "minutes": 1.0, "resumed": False} for s, v in ((0, 0.80), (1, 0.72))]
    assert "misses the goal" in tool.table(rows)


def test_a_missing_run_is_started_with_the_demo_options(tool, tmp_path, monkeypatch):
    calls = []

    def fake_run(command, cwd, check):
        calls.append(command)
        finished_run(Path(command[command.index("--experiment_dir_name") + 1]), 0.75, 0)
        (Path(command[command.index("--experiment_dir_name") + 1]) / "quickstart_wall.json").unlink()

    monkeypatch.setattr(subprocess, "run", fake_run)
    assert tool.main(["--amps", "bf16", "--seeds", "3", "--out", str(tmp_path), "--", "--num_epoch", "1"]) == 0
    (command,) = calls
    assert command[2:] == ["--dataset", "demo", "--amp", "bf16", "--seed", "3", "--experiment_dir_name",
                           str(tmp_path / "bf16-seed3"), "--no_report", "--quiet", "--num_epoch", "1"]
