"""What a careless user or an attacker can do to a run, and what must happen instead: nothing of the
user's is overwritten, huge or hostile files are refused within bounded time and memory, problems are
found before the first epoch, links and names cannot escape, and every message says what to do."""
from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import main_nni
import predict
from reliability_helpers import TinyTANet, write_csv_data, write_jpeg

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def data(tmp_path):
    """D/imgs with 8 JPEGs, D/train.csv and D/test.csv (image,score,theme) over them."""
    folder = write_csv_data(tmp_path, 8, "ab")
    (folder / "images").rename(folder / "imgs")
    return folder


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setattr(main_nni, "TANet", TinyTANet)


def argv(data: pathlib.Path, out: pathlib.Path, *extra: str, train_csv: pathlib.Path | None = None) -> list[str]:
    return ["--dataset", "csv", "--train_csv", str(train_csv or data / "train.csv"),
            "--test_csv", str(data / "test.csv"), "--path_to_images", str(data / "imgs"), "--backbones", "random",
            "--batch_size", "4", "--num_epoch", "1", "--num_workers", "0", "--device", "cpu", "--quiet",
            "--no_report", "--experiment_dir_name", str(out), *extra]


def error_line(capsys, args: list[str], code: int = 1) -> str:
    """main_nni.main(args) exits with ``code`` and one error line, the last, and no traceback."""
    got = main_nni.main(args)
    err = capsys.readouterr().err
    assert got == code, err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert [line for line in lines if " error: " in line] == lines[-1:], err
    return lines[-1]


def snapshot(folder: pathlib.Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- 1, 5: the user's CSVs

def test_a_training_csv_named_like_the_split_is_never_rewritten(data, tmp_path, tiny):
    own = tmp_path / "own"
    own.mkdir()
    mine = own / "train_split.csv"
    mine.write_bytes((data / "train.csv").read_bytes())
    before = snapshot(own)
    for run in ("R1", "R2"):
        assert main_nni.main(argv(data, tmp_path / run, train_csv=mine)) == 0
        assert snapshot(own) == before  # not one byte, not one new file
    recorded = (tmp_path / "R2" / "split" / "train_split.csv").read_text().splitlines()
    assert len(recorded) == 1 + 7 and (tmp_path / "R2" / "split" / "split_info.json").is_file()


def test_the_split_folder_option_never_overwrites_a_users_file(data, tmp_path, tiny, capsys):
    own = tmp_path / "own"
    own.mkdir()
    (own / "val_split.csv").write_text("image,score\nmine.jpg,5\n")
    line = error_line(capsys, argv(data, tmp_path / "R", "--split_dir", str(own)))
    assert "val_split.csv" in line and "never overwritten" in line and "--split_dir" in line
    assert (own / "val_split.csv").read_text() == "image,score\nmine.jpg,5\n"
    mine = own / "train_split.csv"
    mine.write_bytes((data / "train.csv").read_bytes())
    (own / "val_split.csv").unlink()
    line = error_line(capsys, argv(data, tmp_path / "R2", "--split_dir", str(own), train_csv=mine))
    assert str(mine) in line and "never overwritten" in line
    assert mine.read_bytes() == (data / "train.csv").read_bytes()


def test_a_read_only_csv_folder_is_only_read(data, tmp_path, tiny):
    before = {p.name: p.stat().st_mtime_ns for p in data.iterdir()}
    os.chmod(data, 0o555)
    try:
        assert main_nni.main(argv(data, tmp_path / "run-elsewhere" / "R")) == 0
    finally:
        os.chmod(data, 0o755)
    assert {p.name: p.stat().st_mtime_ns for p in data.iterdir()} == {**before, "run-elsewhere": before.get(
        "run-elsewhere", (data / "run-elsewhere").stat().st_mtime_ns)}


# --------------------------------------------------------------------------- 2: finished runs

@pytest.mark.parametrize("epochs", ["1", "0"])
def test_test_only_never_overwrites_a_run(data, tmp_path, tiny, capsys, epochs):
    run = tmp_path / "RUN"
    assert main_nni.main(argv(data, run, "--num_epoch", epochs)) == 0
    torch.manual_seed(1)
    other = tmp_path / "other.pth"
    torch.save({"model": TinyTANet().state_dict(), "variant": "tad66k"}, other)
    before = snapshot(run)
    capsys.readouterr()
    line = error_line(capsys, argv(data, run, "--test_only", "--path_to_model_weight", str(other)))
    assert "already holds a run" in line and "--experiment_dir_name" in line and f"{run}-test" in line
    assert snapshot(run) == before  # results.json, test_predictions.csv and train.log untouched
    # training into it without --resume is refused the same way, also when it has no last.pth
    line = error_line(capsys, argv(data, run))
    assert "already holds a run" in line and "--resume" in line
    assert snapshot(run) == before


# --------------------------------------------------------------------------- 3: huge CSVs

CAPPED = """
import resource, sys
import dataset
def vm():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * resource.getpagesize()
cap = vm() + (1 << 30)  # 1 GiB more than the interpreter with its imports
resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
try:
    dataset.read_score_csv(sys.argv[1])
except dataset.DataError as exc:
    print(str(exc))
    sys.exit(3)
"""


def capped_read(path: pathlib.Path) -> tuple[str, float]:
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", CAPPED, str(path)], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 3, done.stderr[-2000:]
    return done.stdout.strip(), time.monotonic() - started


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["wide_header", "wide_row", "no_image_column", "many_columns", "too_large"])
def test_huge_csvs_are_refused_in_bounded_time_memory_and_words(tmp_path, kind):
    path = tmp_path / f"{kind}.csv"
    with open(path, "w") as f:
        if kind == "wide_header":  # 50 MB header: image,score,x,x,...
            f.write("image,score" + ",x" * 25_000_000 + "\n")
        elif kind == "wide_row":  # one data row of 25M fields
            f.write("image,score\n" + "a.jpg,5" + ",1" * 25_000_000 + "\n")
        elif kind == "no_image_column":
            f.write("y" * 50_000_000 + "\n")
        elif kind == "many_columns":  # short lines, but more columns than any split has
            f.write(",".join(["image", "score"] + [f"c{i}" for i in range(200)]) + "\na.jpg,5" + ",1" * 200 + "\n")
        else:  # 70 MB of well-formed rows: more than a split CSV can hold
            row = "some_image_name_that_is_long.jpg,5\n"
            f.write("image,score\n" + row * (70_000_000 // len(row)))
    message, seconds = capped_read(path)
    assert len(message) < 400 and "\n" not in message, message
    assert str(path) in message
    assert "columns" in message if kind == "many_columns" else ("bytes long" in message or "MiB" in message)


def test_a_duplicated_column_is_refused_by_name(tmp_path, data, tiny, capsys):
    bad = tmp_path / "dup.csv"
    bad.write_text("image,score,score\nim0.jpg,5,9\n")
    line = error_line(capsys, argv(data, tmp_path / "R", train_csv=bad))
    assert "column 'score' appears twice" in line and str(bad) in line


# --------------------------------------------------------------------------- 4: broken images, early

def test_a_broken_test_image_stops_the_run_before_the_first_epoch(data, tmp_path, tiny, capsys):
    broken = data / "imgs" / "im0.jpg"
    broken.write_bytes(broken.read_bytes()[:200])  # a truncated JPEG, the first row of the test CSV
    out = tmp_path / "R"
    line = error_line(capsys, argv(data, out, "--num_epoch", "2"))
    assert "im0.jpg" in line and "cannot be decoded" in line and "--skip_bad" in line
    assert "--check_images exists" in line
    assert "epoch 1" not in (out / "train.log").read_text() and not (out / "last.pth").exists()
    assert main_nni.main(argv(data, tmp_path / "R2", "--skip_bad")) == 0
    assert (tmp_path / "R2" / "bad_images_test.txt").read_text().startswith("im0.jpg\t")
    assert json.loads((tmp_path / "R2" / "results.json").read_text())["n_images"] == 7


# --------------------------------------------------------------------------- 6, 7: links and names

def test_links_out_of_the_image_folder_are_refused_unless_allowed(data, tmp_path, tiny, capsys):
    secret = write_jpeg(tmp_path / "outside.jpg", 99)
    (data / "imgs" / "im3.jpg").unlink()
    (data / "imgs" / "im3.jpg").symlink_to(secret)
    line = error_line(capsys, argv(data, tmp_path / "R"))
    assert "row 4" in line and "im3.jpg" in line and "symbolic link" in line and "--follow_symlinks" in line
    assert f"CSV {data / 'test.csv'}: row 4" in line  # the user's CSV (the test split is read first)
    assert main_nni.main(argv(data, tmp_path / "R2", "--follow_symlinks")) == 0
    (data / "imgs" / "inside.jpg").symlink_to(data / "imgs" / "im4.jpg")  # a link that stays inside is fine
    (data / "test.csv").write_text("image,score\ninside.jpg,5\nim5.jpg,6\n")
    assert main_nni.main(argv(data, tmp_path / "R3", "--follow_symlinks", "--test_only", "--path_to_model_weight",
                              str(tmp_path / "R2" / "last.pth"))) == 0


def test_names_leaving_the_folder_name_the_users_csv_row_and_a_real_option(data, tmp_path, tiny, capsys):
    (data / "train.csv").write_text("image,score\nim0.jpg,5\nim1.jpg,6\nim2.jpg,7\n../x.jpg,5\n")
    line = error_line(capsys, argv(data, tmp_path / "R"))
    assert f"CSV {data / 'train.csv'}: row 4" in line and "--path_to_images" in line
    assert "allow_outside" not in line and "train_split" not in line


def test_control_characters_in_names_reach_no_terminal_or_log(data, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("models.TANet", TinyTANet)  # scoring imports it when it loads a checkpoint
    folder = tmp_path / "photos"
    folder.mkdir()
    write_jpeg(folder / "ok.jpg", 1)
    (folder / "evil\x1b[2J\x1b]0;owned\x07.jpg").write_bytes(b"not a jpeg")
    weights = tmp_path / "tiny.pth"
    torch.save({"model": TinyTANet().state_dict(), "variant": "tad66k"}, weights)
    code = predict.main([str(folder), "--path_to_model_weight", str(weights), "--device", "cpu", "--num_workers", "0",
                         "--quiet", "--output", str(tmp_path / "out.csv")])
    got = capsys.readouterr()
    assert code == 1
    for text in (got.out, got.err):
        assert "\x1b" not in text and "\x07" not in text
    assert "evil\\x1b[2J\\x1b]0;owned\\x07.jpg" in got.out + got.err


# --------------------------------------------------------------------------- 9, 11, 13: messages

def _training_paused_in_epoch_2(data, out) -> subprocess.Popen:
    """main_nni.py on TinyTANet in a child that prints READY after epoch 1 and then waits (a signal's moment)."""
    script = textwrap.dedent("""
        import signal, sys, time, main_nni
        from training import engine
        from reliability_helpers import TinyTANet
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a shell's background job inherits it ignored
        main_nni.TANet = TinyTANet
        real = engine.train_one_epoch
        def slow(*a, **k):
            loss = real(*a, **k)
            if k.get("epoch", 0) >= 1:
                print("READY", flush=True)
                time.sleep(60)
            return loss
        main_nni.train_one_epoch = slow
        sys.exit(main_nni.main(sys.argv[1:]))
    """)
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}"}
    return subprocess.Popen([sys.executable, "-c", script, *argv(data, out, "--num_epoch", "3")], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


@pytest.mark.slow
def test_ctrl_c_prints_one_line_with_the_resume_command(data, tmp_path):
    out = tmp_path / "R"
    proc = _training_paused_in_epoch_2(data, out)
    assert proc.stdout.readline().strip() == "READY"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    last = err.strip().splitlines()[-1]
    assert "interrupted during epoch 2 of 3" in last and "--resume" in last and str(out) in last
    assert "interrupted during epoch 2 of 3" in (out / "train.log").read_text()


@pytest.mark.slow
def test_sigterm_is_ctrl_c_one_line_the_lock_released_and_exit_143(data, tmp_path, tiny):
    """A scheduler, kill or NNI stopping a trial sends SIGTERM: the run stops as on Ctrl-C, exit 128 + 15."""
    out = tmp_path / "R"
    proc = _training_paused_in_epoch_2(data, out)
    assert proc.stdout.readline().strip() == "READY"
    assert (out / ".lock").is_file()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    last = err.strip().splitlines()[-1]
    assert "interrupted (SIGTERM) during epoch 2 of 3" in last and "--resume" in last and str(out) in last
    assert "interrupted (SIGTERM) during epoch 2 of 3" in (out / "train.log").read_text()
    assert not (out / ".lock").exists()
    assert main_nni.main(argv(data, out, "--num_epoch", "3", "--resume")) == 0  # the lock is free


def test_a_corrupt_last_checkpoint_says_how_to_go_on(data, tmp_path, tiny, capsys):
    out = tmp_path / "R"
    common = ("--val_fraction", "0.5")  # 4 validation images: a defined SRCC, so a best.pth
    assert main_nni.main(argv(data, out, "--num_epoch", "2", *common)) == 0
    (out / "last.pth").write_bytes((out / "last.pth").read_bytes()[:1000])
    line = error_line(capsys, argv(data, out, "--num_epoch", "3", "--resume", *common))
    assert "last.pth" in line and "--resume --resume_from best" in line and f"{out}-2" in line
    assert main_nni.main(argv(data, out, "--num_epoch", "3", "--resume", "--resume_from", "best", *common)) == 0
    assert len(json.loads((out / "results.json").read_text())["history"]) == 3


def test_a_bad_experiment_folder_names_the_option_and_the_path(data, tmp_path, tiny, capsys):
    a_file = tmp_path / "taken"
    a_file.write_text("mine")
    line = error_line(capsys, argv(data, a_file))
    assert "--experiment_dir_name" in line and str(a_file) in line and "not a folder" in line
    line = error_line(capsys, argv(data, a_file / "sub"))
    assert "--experiment_dir_name" in line and str(a_file / "sub") in line and "Errno" not in line
    assert a_file.read_text() == "mine"


def test_resuming_with_another_batch_size_warns_in_one_line(data, tmp_path, tiny):
    out = tmp_path / "R"
    assert main_nni.main(argv(data, out)) == 0
    assert main_nni.main(argv(data, out, "--num_epoch", "2", "--resume")) == 0
    assert "--resume with options" not in (out / "train.log").read_text()
    assert main_nni.main(argv(data, out, "--num_epoch", "3", "--resume", "--batch_size", "2")) == 0
    warned = [line for line in (out / "train.log").read_text().splitlines() if "--resume with options" in line]
    assert len(warned) == 1 and "--batch_size 2 (was 4)" in warned[0]


def test_zero_epochs_warn_that_untrained_weights_are_tested(data, tmp_path, tiny):
    out = tmp_path / "R"
    assert main_nni.main(argv(data, out, "--num_epoch", "0")) == 0
    warned = [line for line in (out / "train.log").read_text().splitlines() if "untrained" in line]
    assert len(warned) == 1 and "--num_epoch 0" in warned[0] and "--path_to_model_weight" in warned[0]
    weights = tmp_path / "w.pth"
    torch.save({"model": TinyTANet().state_dict(), "variant": "tad66k"}, weights)
    again = tmp_path / "W"
    assert main_nni.main(argv(data, again, "--num_epoch", "0", "--path_to_model_weight", str(weights))) == 0
    assert "untrained" not in (again / "train.log").read_text()


def test_a_corrupt_exif_warning_names_the_file(tmp_path):
    import struct
    import warnings

    from PIL import Image

    from imagedata.images import load_image

    path = tmp_path / "odd.jpg"
    exif = b"Exif\x00\x00II*\x00" + struct.pack("<IH", 8, 5) + b"\x12\x01"  # 5 tags announced, 2 bytes given
    Image.new("RGB", (16, 16)).save(path, exif=exif)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_image(path)
    messages = [str(w.message) for w in caught]
    assert any("Corrupt EXIF data" in m for m in messages), messages
    assert all(str(path) in m for m in messages), messages


# --------------------------------------------------------------------------- 14, 15: predict.py

@pytest.fixture
def tiny_weights(tmp_path, monkeypatch):
    monkeypatch.setattr("models.TANet", TinyTANet)  # scoring imports it when it loads a checkpoint
    path = tmp_path / "tiny.pth"
    torch.save({"model": TinyTANet().state_dict(), "variant": "tad66k"}, path)
    return str(path)


def test_predict_checks_its_output_before_scoring(tmp_path, tiny_weights, capsys, monkeypatch):
    import scoring

    images = tmp_path / "photos"
    images.mkdir()
    write_jpeg(images / "a.jpg", 0)
    listed = tmp_path / "list.txt"
    listed.write_text("photos/a.jpg\n")
    monkeypatch.setattr(scoring.Scorer, "__init__", lambda *a, **k: pytest.fail("scored before checking"))
    (tmp_path / "out.csv").mkdir()
    for output, words in ((tmp_path / "out.csv", "is a folder"), (listed.with_suffix(".csv"), None)):
        if words is None:  # the input list itself, by another name: a .csv list given as input and output
            csv_list = listed.with_suffix(".csv")
            csv_list.write_text("image\nphotos/a.jpg\n")
            code = predict.main([str(csv_list), "--path_to_model_weight", tiny_weights, "--output", str(csv_list)])
            assert code == 2 and "also an input" in capsys.readouterr().err
            assert csv_list.read_text() == "image\nphotos/a.jpg\n"
            continue
        code = predict.main([str(images), "--path_to_model_weight", tiny_weights, "--output", str(output)])
        assert code == 2 and words in capsys.readouterr().err


def test_predict_scores_a_jpeg_named_heic_and_lists_what_it_skipped(tmp_path, tiny_weights, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    write_jpeg(folder / "a.jpg", 0)
    write_jpeg(folder / "phone.heic", 1)  # a JPEG with another name
    (folder / "notes.txt").write_text("not an image")
    code = predict.main([str(folder), "--path_to_model_weight", tiny_weights, "--device", "cpu", "--num_workers", "0",
                         "--quiet"])
    got = capsys.readouterr()
    assert code == 0, got.err
    assert "phone.heic" in got.out and "a.jpg" in got.out
    assert "skipped" in got.err and "notes.txt" in got.err and "not an image" in got.err


def test_predict_refuses_links_out_of_a_folder_unless_allowed(tmp_path, tiny_weights, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    write_jpeg(folder / "a.jpg", 0)
    (folder / "b.jpg").symlink_to(write_jpeg(tmp_path / "private.jpg", 1))
    common = [str(folder), "--path_to_model_weight", tiny_weights, "--device", "cpu", "--num_workers", "0", "--quiet"]
    assert predict.main(common) == 1
    got = capsys.readouterr()
    assert "symbolic link" in got.out + got.err and "--follow_symlinks" in got.out + got.err
    assert predict.main([*common, "--follow_symlinks"]) == 0
