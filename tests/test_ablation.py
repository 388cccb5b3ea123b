"""The ablation table (Table 5): every variant trained and tested by main_nni.py over the seeds, the
table in the paper's layout, and a rerun after an interruption that runs only what is missing."""
from __future__ import annotations

import functools
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import option
from paper import ablation
REPO = Path(__file__).resolve().parents[1]
run_table = functools.partial(ablation.run_table, read_options=option.parse_trial_options)
check_same_options = functools.partial(ablation.check_same_options, read_options=option.parse_trial_options)


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
        run_table(tmp_path, [0], ["--seed", "3"], show_progress=False)
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
        run_table(tmp_path, [0], options, show_progress=False, on_run=interrupt_after_two)
    first = {name: (tmp_path / name / "results.json").read_bytes() for name in done}
    started = {p.name for p in tmp_path.iterdir() if p.is_dir()}
    assert started == set(done)  # interrupted after the second run: the third never began
    # the same table from the command line: only the two missing runs
    assert paper_tables().main(["ablation", "--out", str(tmp_path), "--seeds", "0", *options]) == 0
    table = json.loads((tmp_path / "table5.json").read_text())
    assert all((tmp_path / name / "results.json").read_bytes() == data for name, data in first.items())
    assert all((tmp_path / name / "results.json").is_file()
               for name in ("aesthetics-rgb-seed0", "aesthetics-theme-rgb-seed0"))
    rows = {row["variant"]: row for row in table["rows"]}
    assert set(rows) == {"APNet", "APNet + TUNet", "APNet + RGBNet", "TANet"}
    assert all(row["train_images_per_s"][0] > 0 and row["error"] == "mse" for row in rows.values())
    text = (tmp_path / "table5.md").read_text()
    assert "| APNet + RGBNet | aesthetics, rgb |" in text and "0.513 / 0.531 / 0.016" in text
    assert all(c.startswith("python main_nni.py --dataset demo") for c in table["commands"])


def test_the_command_passes_main_nni_options_and_refuses_its_own(tmp_path, capsys):
    tool = paper_tables()
    args, rest = tool.build_parser().parse_known_args(["ablation", "--out", "o", "--seeds", "0", "1",
                                                        "--dataset", "demo",
                                                        "--demo_images", "600", "160", "--num_epoch", "3"])
    assert args.seeds == [0, 1] and rest == ["--dataset", "demo", "--demo_images", "600", "160", "--num_epoch", "3"]
    assert tool.main(["ablation", "--out", str(tmp_path), "--seed", "3"]) == 1  # not an abbreviation of --seeds
    assert "--seed: the ablation table sets these" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        tool.main(["personalized", "--out", str(tmp_path), "--num_epoch", "3"])  # only ablation passes options on


def started(folder, name="aesthetics-seed0"):
    """A run of the table that has trained (a checkpoint in its folder)."""
    (folder / name).mkdir(parents=True)
    (folder / name / "last.pth").write_bytes(b"weights")


def test_a_rerun_with_other_options_is_refused(tmp_path):
    check_same_options(tmp_path, ["--dataset", "demo", "--num_epoch", "3"])
    started(tmp_path)
    check_same_options(tmp_path, ["--dataset", "demo", "--num_epoch", "3"])
    with pytest.raises(ablation.AblationError, match="made with the options '--dataset demo --num_epoch 3'"):
        check_same_options(tmp_path, ["--dataset", "demo", "--num_epoch", "4"])


def test_options_are_compared_as_main_nni_reads_them(tmp_path):
    """Another spelling or order of the same options is the same table."""
    check_same_options(tmp_path, ["--dataset", "demo", "--num_epoch", "3", "--demo_images", "48", "16"])
    started(tmp_path)
    check_same_options(tmp_path, ["--demo_images", "48", "16", "--num_epoch=3", "--dataset=demo"])
    check_same_options(tmp_path, ["--dataset", "demo", "--num_epoch", "3", "--demo_images", "48", "16",
                                           "--batch_size", "40"])  # demo's default batch size, said aloud
    with pytest.raises(ablation.AblationError, match="another --out"):
        check_same_options(tmp_path, ["--dataset", "demo", "--num_epoch", "3"])  # the default 1800 640 images


def test_options_of_an_earlier_version_are_compared_parsed(tmp_path):
    (tmp_path / ablation.OPTIONS_FILE).write_text(json.dumps(["--dataset", "demo", "--num_epoch", "3"]))
    started(tmp_path)
    check_same_options(tmp_path, ["--num_epoch=3", "--dataset", "demo"])
    with pytest.raises(ablation.AblationError):
        check_same_options(tmp_path, ["--num_epoch=4", "--dataset", "demo"])


def test_a_typo_is_refused_before_anything_is_recorded(tmp_path):
    with pytest.raises(ablation.AblationError, match="--bogus_opt") as err:
        run_table(tmp_path, [0], ["--dataset", "demo", "--bogus_opt", "3"], show_progress=False)
    assert "main_nni.py" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ablation.AblationError, match="--num_epoch"):
        run_table(tmp_path, [0], ["--dataset", "demo", "--num_epoch", "three"], show_progress=False)
    with pytest.raises(ablation.AblationError, match="--experiment_dir"):  # an abbreviation of one of its own
        run_table(tmp_path, [0], ["--experiment_dir", "x"], show_progress=False)
    assert not (tmp_path / ablation.OPTIONS_FILE).exists() and not (tmp_path / "runs.log").exists()


def test_a_folder_with_no_started_run_takes_new_options(tmp_path):
    """Options that made no run (main_nni.py refused them) do not bind the folder."""
    check_same_options(tmp_path, ["--dataset", "demo", "--num_epoch", "3"])
    (tmp_path / "aesthetics-seed0").mkdir()  # a run that stopped before its first checkpoint
    check_same_options(tmp_path, ["--dataset", "demo", "--num_epoch", "4"])
    started(tmp_path, "aesthetics-theme-seed0")
    check_same_options(tmp_path, ["--dataset", "demo", "--num_epoch=4"])
    with pytest.raises(ablation.AblationError):
        check_same_options(tmp_path, ["--dataset", "demo", "--num_epoch", "3"])


@pytest.mark.parametrize("code, cause, again", [(1, "error: run folder X is in use by another run (pid 7)", False),
                                                (130, "interrupted: continue from the last epoch with: ...", True)])
def test_a_failed_run_says_why(tmp_path, monkeypatch, code, cause, again):
    """The child's own last line is in the message, not only in runs.log; "run the same command again"
    only where that continues the table."""
    script = f"import sys; print('12:00:00 data: train 43'); print({'12:00:01 ' + cause!r}, file=sys.stderr); " \
             f"sys.exit({code})"
    monkeypatch.setattr(ablation.Run, "command", lambda self, options: [sys.executable, "-c", script])
    with pytest.raises(ablation.AblationError) as err:
        run_table(tmp_path, [0], ["--dataset", "demo"], show_progress=False)
    message = str(err.value)
    assert cause in message and "12:00:01" not in message and str(tmp_path / "runs.log") in message
    assert ("run the same command again" in message) == again, message


# --------------------------------------------------------------------------- the child dies with its parent

CHILD = ("import os, signal, sys, time\n"
         "signal.signal(signal.SIGTERM, lambda *a: (open(sys.argv[1], 'w').write('SIGTERM'), sys.exit(143)))\n"
         "open(sys.argv[1] + '.pid', 'w').write(str(os.getpid()))\n"
         "time.sleep(60)\n")
PARENT = ("import sys\n"
          "sys.path.insert(0, sys.argv[1])\n"
          "from helpers.runtime import run_tied_child\n"
          "try:\n"
          "    run_tied_child([sys.executable, '-c', sys.argv[2], sys.argv[3]])\n"
          "except KeyboardInterrupt:\n"
          "    print('interrupted')\n"
          "    sys.exit(130)\n")


def wait_for(predicate, seconds=20.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_the_child_ends_with_its_parent(tmp_path, sig):
    """SIGKILL of the parent: the child gets SIGTERM from the kernel; SIGTERM: the parent passes it on,
    waits for the child, and ends as interrupted."""
    marker = tmp_path / "child"
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(REPO), CHILD, str(marker)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert wait_for(lambda: Path(f"{marker}.pid").is_file() and Path(f"{marker}.pid").read_text())
        child = int(Path(f"{marker}.pid").read_text())
        parent.send_signal(sig)
        out, _ = parent.communicate(timeout=30)
        assert wait_for(lambda: not alive(child)), "the child outlived its parent"
        assert marker.read_text() == "SIGTERM"
        if sig == signal.SIGTERM:
            assert parent.returncode == 130 and "interrupted" in out
    finally:
        parent.kill()
        parent.wait()


def children(pid):
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_sigkill_of_the_table_ends_its_run_and_a_rerun_goes_on(tmp_path, options):
    """SIGKILL of tools/paper_tables.py ablation while main_nni.py trains: the run ends too (no orphan
    holding the run folder), and the table is then made (with other options: no run had finished)."""
    long = [o if o != "1" or options[i - 1] != "--num_epoch" else "50" for i, o in enumerate(options)]
    command = [sys.executable, str(REPO / "tools" / "paper_tables.py"), "ablation", "--out", str(tmp_path),
               "--seeds", "0"]
    parent = subprocess.Popen(command + long, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_for(lambda: children(parent.pid), 120), "no main_nni.py child"
        (child,) = children(parent.pid)
        assert wait_for(lambda: (tmp_path / "aesthetics-seed0" / ".lock").is_file(), 120)
        parent.kill()
        parent.wait()
        assert wait_for(lambda: not alive(child), 60), "main_nni.py outlived tools/paper_tables.py"
    finally:
        parent.kill()
        parent.wait()
    assert paper_tables().main(["ablation", "--out", str(tmp_path), "--seeds", "0", *options]) == 0
    assert all((tmp_path / name / "results.json").is_file()
               for name in ("aesthetics-seed0", "aesthetics-theme-rgb-seed0"))
