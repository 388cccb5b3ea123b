"""Every JSON file the project writes is strict JSON (RFC 8259: no NaN or Infinity): an undefined
metric is null with its reason beside it (issue 23, item 17)."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from paper import ablation
import main_nni
import option
from helpers import safe_io
from reliability_helpers import TinyTANet

REPO = Path(__file__).resolve().parents[1]


def strict_loads(text: str):
    """json.loads that refuses NaN, Infinity and -Infinity."""
    def refuse(name: str):
        raise ValueError(f"not strict JSON: {name}")
    return json.loads(text, parse_constant=refuse)


def strict_files(folder: Path) -> list[Path]:
    """Every *.json under ``folder``, each parsed strictly (a failure names the file)."""
    found = sorted(folder.rglob("*.json"))
    for path in found:
        try:
            strict_loads(path.read_text(encoding="utf-8"))
        except ValueError as exc:
            pytest.fail(f"{path}: {exc}")
    return found


def test_non_finite_numbers_are_written_as_null(tmp_path):
    target = tmp_path / "m.json"
    safe_io.atomic_save_json({"srcc": float("nan"), "rows": [float("inf"), -float("inf"), 1.5], "n": 3}, target)
    assert strict_loads(target.read_text()) == {"srcc": None, "rows": [None, None, 1.5], "n": 3}
    assert safe_io.json_text({"a": (1, float("nan"))}) == '{"a": [1, null]}'


def test_no_json_is_written_outside_the_strict_writer():
    """json.dump/json.dumps appear in safe_io.py only (tests aside): every writer goes through it."""
    offenders = []
    for path in sorted(REPO.rglob("*.py")):
        rel = path.relative_to(REPO)
        if rel.parts[0] in ("tests", "runs", ".venv") or rel == Path("helpers/safe_io.py") \
                or "site-packages" in rel.parts:
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        offenders += [f"{rel}:{i}" for i, line in enumerate(text.splitlines(), 1)
                      if re.search(r"\bjson\.dumps?\(", line.split("#")[0])]
    assert not offenders, offenders


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setattr(main_nni, "TANet", TinyTANet)


def trial(demo_root, out: Path, *extra: str) -> list[str]:
    return ["--dataset", "demo", "--demo_images", "48", "16", "--path_to_save_csv", str(demo_root), "--max_images",
            "3", "--batch_size", "2", "--num_epoch", "1", "--num_workers", "0", "--device", "cpu", "--quiet",
            "--no_report", "--experiment_dir_name", str(out), *extra]


def test_every_json_of_a_trial_is_strict_and_says_why_a_metric_is_null(tiny, demo_root, tmp_path):
    """3 images of each split: the validation SRCC and the per-theme ones are undefined."""
    out = tmp_path / "run"
    assert main_nni.main(trial(demo_root, out)) == 0
    assert main_nni.main(trial(demo_root, tmp_path / "test", "--test_only", "--path_to_model_weight",
                               str(out / "last.pth"))) == 0
    files = strict_files(tmp_path)
    assert {p.name for p in files} >= {"results.json"}
    results = strict_loads((out / "results.json").read_text())
    nulls = [name for name, m in results["per_theme"].items() if m["srcc"] is None]
    assert nulls and all(results["per_theme"][name]["undefined"] for name in nulls)
    for epoch in results["history"]:
        assert epoch["val_srcc"] is not None or epoch["val_undefined"]


def test_the_ablation_table_json_is_strict(tiny, demo_root, tmp_path, monkeypatch):
    def execute(run, options, log):  # main_nni.py in this process, on TinyTANet
        assert main_nni.main(run.command(options)[2:]) == 0

    monkeypatch.setattr(ablation, "execute", execute)
    options = trial(demo_root, tmp_path)[:-2]
    options[options.index("--max_images") + 1] = "1"  # one test image: SRCC undefined in every run
    table = ablation.run_table(tmp_path / "t5", [0], options, read_options=option.parse_trial_options,
                               show_progress=False)
    assert any(math.isnan(row["srcc"][0]) for row in table["rows"])  # undefined on 3 images
    strict_files(tmp_path / "t5")
    saved = strict_loads((tmp_path / "t5" / "table5.json").read_text())
    assert all(row["srcc"][0] is None or row["srcc"][0] == row["srcc"][0] for row in saved["rows"])


def test_a_personalized_workers_undefined_srcc_reads_back_as_nan(tmp_path):
    """A worker's record holds an undefined SRCC as null; read back (a resumed run) it is NaN again, as the
    table's summary counts it."""
    from paper.personalize import ResultStore

    store = ResultStore(tmp_path, {"seed": 0})
    store.record({"worker": "w1", "shots": {"10": {"draws": [{"generic_srcc": float("nan"), "finetuned_srcc": 0.5}]}}})
    strict_files(tmp_path)
    draw = store.done("w1")["shots"]["10"]["draws"][0]
    assert math.isnan(draw["generic_srcc"]) and draw["finetuned_srcc"] == 0.5
