"""The analysis report: figures, HTML and TensorBoard from a short demo run; its pieces on synthetic data."""
from __future__ import annotations

import base64
import io
import json
import shutil
import math
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import main_nni
import report
from report import figures, passes, stats
from report.__main__ import main as report_main
from helpers.preprocessing import IMAGENET_MEAN, IMAGENET_STD
from report.figures import ScoredImage
from models import TANet

TRAIN = ["--dataset", "demo", "--demo_images", "48", "16", "--max_images", "16", "--batch_size", "8",
         "--num_epoch", "1", "--num_workers", "0", "--device", "cpu", "--quiet", "--no_report"]
RUN_FIGURES = {"per_theme_metrics", "per_theme_means", "scatter", "histograms", "rgb_attention", "hidden_nodes",
               "best_worst"}


def logs_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in (folder / "logs").glob("events.out.tfevents.*"))


@pytest.fixture(scope="module")
def run(demo_root, tmp_path_factory):
    """A one-epoch demo run and its report, made with the CLI; (run folder, events bytes before the report)."""
    out = tmp_path_factory.mktemp("run")
    assert main_nni.main([*TRAIN, "--path_to_save_csv", str(demo_root), "--experiment_dir_name", str(out)]) == 0
    before = logs_size(out)
    assert report_main([str(out), "--device", "cpu", "--quiet"]) == 0
    return out, before


def report_data(folder: Path) -> dict:
    return json.loads((folder / "report" / "report_data.json").read_text())


def assert_valid_png(path: Path) -> None:
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        assert img.format == "PNG" and img.mode in ("RGB", "RGBA"), (path, img.mode)
        assert min(img.size) >= 200, (path, img.size)
        pixels = np.asarray(img.convert("RGB"), dtype=float)
    assert pixels.std() > 10, f"{path.name} looks blank (pixel std {pixels.std():.1f})"
    packed = pixels.astype(np.int64) @ np.array([1 << 16, 1 << 8, 1])
    assert len(np.unique(packed)) > 8, f"{path.name} has almost no colours"


# --- the run's report ------------------------------------------------------------------------

@pytest.mark.slow
def test_every_figure_is_written_as_a_valid_non_blank_png(run):
    folder, _ = run
    written = {p.stem for p in (folder / "report").glob("*.png")}
    assert written == RUN_FIGURES
    for name in RUN_FIGURES:
        assert_valid_png(folder / "report" / f"{name}.png")


class _Images(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.srcs: list[str] = []
        self.cells: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.srcs.append(dict(attrs)["src"])

    def handle_data(self, data):
        self.cells.append(data.strip())


@pytest.mark.slow
def test_html_embeds_every_figure_and_references_no_missing_file(run):
    folder, _ = run
    page = (folder / "report.html").read_text(encoding="utf-8")
    parser = _Images()
    parser.feed(page)
    assert len(parser.srcs) == len(RUN_FIGURES)
    embedded = set()
    for src in parser.srcs:
        if src.startswith("data:image/png;base64,"):
            png = base64.b64decode(src.split(",", 1)[1], validate=True)
            with Image.open(io.BytesIO(png)) as img:
                img.verify()
            embedded.add(png)
        else:  # a relative file must exist beside the page
            assert (folder / src).is_file(), src
    assert embedded == {p.read_bytes() for p in (folder / "report").glob("*.png")}
    # The per-theme table: every demo theme with its image count.
    for theme in ("architecture", "flower", "mono", "vintage"):
        assert theme in parser.cells


@pytest.mark.slow
def test_html_opens_in_a_headless_browser_without_broken_images(run):
    browser = next((b for b in ("/usr/bin/chromium", shutil.which("chromium") or "",
                                shutil.which("chromium-browser") or "") if b and Path(b).is_file()), None)
    if browser is None:
        pytest.skip("chromium is not installed (the HTML is checked with html.parser above)")
    folder, _ = run
    dom = subprocess.run([browser, "--headless", "--disable-gpu", "--no-sandbox", "--virtual-time-budget=5000",
                          "--dump-dom", (folder / "report.html").as_uri()],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    assert 'data-broken-images="0"' in dom


@pytest.mark.slow
def test_per_theme_numbers_agree_with_the_runs_results(run):
    folder, _ = run
    results = json.loads((folder / "results.json").read_text())
    rows = {r["theme"]: r for r in report_data(folder)["per_theme"]}
    assert set(rows) == set(results["per_theme"])
    assert sum(r["n"] for r in rows.values()) == 16
    for theme, expected in results["per_theme"].items():
        assert rows[theme]["n"] == expected["n"]
        for key in ("srcc", "plcc"):  # the CSV keeps 6 decimals
            assert rows[theme][key] == pytest.approx(expected[key], abs=1e-4, nan_ok=True)
        assert 1.0 <= rows[theme]["mean_true"] <= 10.0 and 1.0 <= rows[theme]["mean_pred"] <= 10.0


@pytest.mark.slow
def test_hidden_node_counts_cover_every_image_and_the_pass_reproduces_the_predictions(run):
    folder, _ = run
    data = report_data(folder)
    pass_ = data["model_pass"]
    assert pass_["n_images"] == 16 and pass_["batch_size"] == 8
    assert len(pass_["hidden_most_positive"]) == len(pass_["hidden_most_negative"]) == 100
    assert sum(pass_["hidden_most_positive"]) == sum(pass_["hidden_most_negative"]) == 16
    # the run's own evaluation path (the demo's: folded, fused, channels-last, its precision), batches of
    # eval_batch_size in file order: the scores of test_predictions.csv (written with 6 decimals)
    assert data["rerun_max_difference"] <= 1e-5
    assert "differs" not in (folder / "report.html").read_text(encoding="utf-8")
    assert len(data["rgb_attention_images"]) == 3 and len(data["best"]) == len(data["worst"]) == 5


@pytest.mark.slow
def test_a_real_mismatch_is_reported_with_what_differs(run, tmp_path):
    folder, _ = run
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy, ignore=shutil.ignore_patterns("logs", "report*"))
    made = report.write_report(copy, device="cpu", options={"eval_batch_size": 3}, tensorboard=False)
    assert made.rerun_max_difference > 1e-5
    assert len(made.notes) == 1 and "batch_size 8 in the run, 3 in the pass" in made.notes[0]


@pytest.mark.slow
def test_report_adds_the_figures_to_tensorboard(run):
    folder, before = run
    assert logs_size(folder) > before
    events = b"".join(p.read_bytes() for p in (folder / "logs").glob("events.out.tfevents.*"))
    for name in RUN_FIGURES:
        assert f"report/{name}".encode() in events


@pytest.mark.slow
def test_checkpoint_on_a_split_with_a_cap_and_no_tensorboard(run, demo_root, tmp_path):
    folder, _ = run
    out = tmp_path / "out"
    assert report_main(["--checkpoint", str(folder / "best.pth"), "--out", str(out), "--dataset", "demo",
                        "--path_to_save_csv", str(demo_root), "--demo_images", "48", "16", "--max_images", "4",
                        "--eval_batch_size", "4", "--device", "cpu", "--no_tensorboard", "--quiet"]) == 0
    data = report_data(out)
    assert data["n_images"] == data["model_pass"]["n_images"] == 4
    assert data["rerun_max_difference"] is None
    assert (out / "report.html").is_file() and not (out / "logs").exists()
    assert {p.stem for p in (out / "report").glob("*.png")} == RUN_FIGURES
    # scored by the model pass: the first 4 images of the run's predictions, same batch of 4 -> close scores
    csv = report.read_predictions(folder / "test_predictions.csv")
    assert sorted(data["best"] + data["worst"]) == sorted(csv.names[:4])


# --- errors ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_missing_files_fail_with_one_line_naming_them(run, tmp_path, capsys):
    folder, _ = run
    assert report_main([str(tmp_path / "nowhere"), "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert "nowhere" in err and err.count("\n") == 1

    assert report_main([str(tmp_path), "--device", "cpu"]) == 1
    assert "test_predictions.csv not found" in capsys.readouterr().err

    shutil.copy(folder / "test_predictions.csv", tmp_path / "test_predictions.csv")
    assert report_main([str(tmp_path), "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert "best.pth" in err and err.count("\n") == 1

    assert report_main([str(folder), "--checkpoint", str(tmp_path / "gone.pth"), "--device", "cpu"]) == 1
    assert "gone.pth not found" in capsys.readouterr().err

    plain = tmp_path / "plain.pth"  # a released-style checkpoint: weights only, no run options
    torch.save(torch.load(folder / "best.pth", weights_only=True)["model"], plain)
    assert report_main(["--checkpoint", str(plain), "--out", str(tmp_path / "o"), "--device", "cpu"]) == 1
    assert "holds no run options: pass --dataset" in capsys.readouterr().err

    assert report_main([str(folder), "--attention_images", "nope.jpg", "--device", "cpu", "--quiet"]) == 1
    assert "attention image 'nope.jpg' is not among" in capsys.readouterr().err


def test_bad_prediction_rows_and_columns_are_named(tmp_path):
    bad = tmp_path / "test_predictions.csv"
    bad.write_text("image,theme,true_score,pred_score\na.jpg,x,5.0,6.0\nb.jpg,x,7.0,oops\n")
    with pytest.raises(report.ReportError, match=r"row 3 \(b.jpg\): pred_score 'oops'"):
        report.read_predictions(bad)
    bad.write_text("image,score\na.jpg,5.0\n")
    with pytest.raises(report.ReportError, match="lacks the column"):
        report.read_predictions(bad)


def test_usage_errors_exit_2(capsys):
    for argv in ([], ["--checkpoint", "x.pth"], ["run", "--out", "x"]):
        with pytest.raises(SystemExit) as exc:
            report_main(argv)
        assert exc.value.code == 2


# --- pieces on synthetic data ----------------------------------------------------------------

def test_themes_with_fewer_than_two_images_show_as_n_a():
    table = stats.ScoreTable(["a", "b", "c", "d", "e"], ["big", "big", "big", "alone", ""],
                                 np.array([2.0, 5.0, 8.0, 4.0, 6.0]), np.array([3.0, 5.0, 7.0, 5.0, 5.0]))
    rows = stats.theme_rows(table)
    assert [r.theme for r in rows] == ["alone", "big"]  # the blank theme is left out
    alone = rows[0]
    assert alone.n == 1 and math.isnan(alone.srcc) and math.isnan(alone.plcc) and alone.mean_pred == 5.0
    assert rows[1].srcc == pytest.approx(1.0) and rows[1].mean_true == pytest.approx(5.0)
    fig = figures.per_theme_metrics_figure(rows)
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert labels == ["big (n=3)", "alone (n=1)"]  # sorted by SRCC, NaN last
    assert "n/a" in [t.get_text().strip() for t in fig.axes[0].texts]
    page = report.render_html("t", [], {"per_theme_metrics": figures.png_bytes(fig)}, rows, [])
    assert "<td>alone</td><td>1</td><td>n/a</td><td>n/a</td>" in page


def test_spread_and_hidden_counts():
    assert stats.spread(np.array([5.0, 1.0, 9.0, 3.0, 7.0]), 3) == [1, 0, 2]
    assert stats.spread(np.array([4.0]), 3) == [0]
    hidden = np.zeros((3, 100))
    hidden[0, 7], hidden[1, 7], hidden[2, 2] = 5.0, 3.0, 1.0
    hidden[0, 50], hidden[1, 99], hidden[2, 99] = -1.0, -2.0, -3.0
    pos, neg = stats.hidden_counts(hidden)
    assert pos[7] == 2 and pos[2] == 1 and pos.sum() == 3
    assert neg[99] == 2 and neg[50] == 1 and neg.sum() == 3


def test_denormalise_undoes_the_imagenet_normalisation():
    rgb = np.random.default_rng(0).uniform(size=(3, 4, 5))
    normalised = (rgb - np.array(IMAGENET_MEAN)[:, None, None]) / np.array(IMAGENET_STD)[:, None, None]
    assert np.allclose(figures.denormalise(normalised), rgb.transpose(1, 2, 0))
    with pytest.raises(ValueError, match="expects a"):
        figures.denormalise(np.zeros((4, 2, 2)))


def test_ava_distribution_figure(tmp_path):
    rng = np.random.default_rng(1)
    true, pred = rng.dirichlet(np.ones(10), size=4), rng.dirichlet(np.ones(10), size=4)
    images = [ScoredImage(f"{i}.jpg", 5.0, 5.5) for i in range(4)]
    path = tmp_path / "d.png"
    path.write_bytes(figures.png_bytes(figures.distributions_figure(images, true, pred)))
    assert_valid_png(path)
    with pytest.raises(ValueError, match="distributions"):
        figures.distributions_figure(images, true[:3], pred)


class _Tensors(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        self.x = torch.randn(n, 3, 224, 224, generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.x[i], "index": i, "path": f"{i}.jpg", "theme": "", "target": torch.zeros(10)}


@pytest.fixture(scope="module")
def ava_model():
    torch.manual_seed(0)
    return TANet("ava", theme_fusion="batch").eval()


def test_model_pass_batches_in_file_order_and_handles_a_lone_ava_image(ava_model):
    data = _Tensors(3)
    result = passes.model_pass(ava_model, data, batch_size=2, limit=None, device=torch.device("cpu"),
                                  num_workers=0, progress=False)
    assert result.index == [0, 1, 2] and result.output.shape == (3, 10) and result.hidden.shape == (3, 100)
    # the last batch is one image, which skips the theme matrix: its hidden nodes are still there
    with torch.no_grad():
        expected = ava_model.tygertnet.hidden(ava_model.res365_last(data.x)).numpy()
    assert np.allclose(result.hidden, expected, atol=1e-5)
    assert np.allclose(result.pred("ava"), (result.output * np.arange(1, 11)).sum(1))


def test_rgb_attention_figure_from_a_model(ava_model, tmp_path):
    data = _Tensors(2)
    inputs, patches, sim = passes.rgb_attention_inputs(ava_model, data, [1, 0], torch.device("cpu"))
    assert inputs.shape == (2, 3, 224, 224) and patches.shape == (2, 3, 12, 12) and sim.shape == (2, 144, 144)
    assert np.allclose(np.diagonal(sim, axis1=1, axis2=2), 1.0, atol=1e-5)
    assert np.allclose(inputs[0], data.x[1].numpy())
    fig = figures.rgb_attention_figure([ScoredImage("1.jpg", 3.0, 4.0), ScoredImage("0.jpg", 6.0, 5.0)],
                                       inputs, patches, sim)
    path = tmp_path / "a.png"
    path.write_bytes(figures.png_bytes(fig))
    assert_valid_png(path)



def test_rgb_attention_figure_titles_an_unknown_true_score_with_the_prediction_alone():
    rng = np.random.default_rng(0)
    inputs, patches = rng.normal(size=(2, 3, 224, 224)), rng.normal(size=(2, 3, 12, 12))
    sim = rng.uniform(-1, 1, size=(2, 144, 144))
    fig = figures.rgb_attention_figure([ScoredImage("a.jpg", 3.0, 4.0), ScoredImage("b.jpg", float("nan"), 5.0)],
                                       inputs, patches, sim)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title().endswith(("4.00", "5.00"))]
    assert titles == ["a.jpg\ntrue 3.00, predicted 4.00", "b.jpg\npredicted 5.00"]
