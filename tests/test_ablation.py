"""The ablation table (Table 5): every variant trained and tested by main_nni.py over the seeds, the
table in the paper's layout, and a rerun after an interruption that runs only what is missing."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

import ablation

REPO = Path(__file__).resolve().parents[1]


def paper_tables():
    spec = importlib.util.spec_from_file_location("paper_tables_for_ablation", REPO / "tools" / "paper_tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def options(demo_root):
    return ["--dataset", "demo", "--demo_images", "48", "16", "--path_to_save_csv", str(demo_root), "--max_images",
            "16", "--batch_size", "8", "--num_epoch", "1", "--num_workers", "0", "--device", "cpu", "--no_report"]


def test_the_table_sets_branches_and_seeds_itself(tmp_path):
    with pytest.raises(ablation.AblationError, match="--seed"):
        ablation.run_table(tmp_path, [0], ["--seed", "3"], show_progress=False)
    runs = ablation.plan(tmp_path, [0, 1])
    assert [r.name for r in runs[::2]] == ["APNet", "APNet + TUNet", "APNet + RGBNet", "TANet"]
    assert runs[-1].branches == ("aesthetics", "theme", "rgb") and runs[-1].folder.name == "aesthetics-theme-rgb-seed1"
    command = runs[0].command(["--dataset", "demo"])
    assert command[-7:] == ["--branches", "aesthetics", "--seed", "0", "--experiment_dir_name",
                            str(tmp_path / "aesthetics-seed0"), "--quiet"]


@pytest.mark.slow
def test_the_table_is_made_and_a_rerun_runs_only_what_is_missing(tmp_path, options):
    done = []

    def interrupt_after_two(run):
        done.append(run.folder.name)
        if len(done) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ablation.run_table(tmp_path, [0], options, show_progress=False, on_run=interrupt_after_two)
    first = {name: (tmp_path / name / "results.json").read_bytes() for name in done}
    started = {p.name for p in tmp_path.iterdir() if p.is_dir()}
    assert started == set(done)  # interrupted after the second run: the third never began
    # the same table from the command line: only the two missing runs
    assert paper_tables().main(["ablation", "--out", str(tmp_path), "--seeds", "0", *options]) == 0
    table = json.loads((tmp_path / "table5.json").read_text())
    assert all((tmp_path / name / "results.json").read_bytes() == data for name, data in first.items())
    assert all((tmp_path / name / "results.json").is_file() for name in ("aesthetics-rgb-seed0", "aesthetics-theme-rgb-seed0"))
    rows = {row["variant"]: row for row in table["rows"]}
    assert set(rows) == {"APNet", "APNet + TUNet", "APNet + RGBNet", "TANet"}
    assert all(row["train_images_per_s"][0] > 0 and row["error"] == "mse" for row in rows.values())
    text = (tmp_path / "table5.md").read_text()
    assert "| APNet + RGBNet | aesthetics, rgb |" in text and "0.513 / 0.531 / 0.016" in text
    assert all(c.startswith("python main_nni.py --dataset demo") for c in table["commands"])


def test_the_command_passes_main_nni_options_and_refuses_its_own(tmp_path, capsys):
    tool = paper_tables()
    args, rest = tool.build_parser().parse_known_args(["ablation", "--out", "o", "--seeds", "0", "1", "--dataset", "demo",
                                                        "--demo_images", "600", "160", "--num_epoch", "3"])
    assert args.seeds == [0, 1] and rest == ["--dataset", "demo", "--demo_images", "600", "160", "--num_epoch", "3"]
    assert tool.main(["ablation", "--out", str(tmp_path), "--seed", "3"]) == 1  # not an abbreviation of --seeds
    assert "--seed: the ablation table sets these" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        tool.main(["personalized", "--out", str(tmp_path), "--num_epoch", "3"])  # only ablation passes options on


def test_a_rerun_with_other_options_is_refused(tmp_path):
    ablation.check_same_options(tmp_path, ["--dataset", "demo", "--num_epoch", "3"])
    ablation.check_same_options(tmp_path, ["--dataset", "demo", "--num_epoch", "3"])
    with pytest.raises(ablation.AblationError, match="made with the options '--dataset demo --num_epoch 3'"):
        ablation.check_same_options(tmp_path, ["--dataset", "demo", "--num_epoch", "4"])
