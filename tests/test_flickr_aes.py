"""imagedata/flickr_aes.py and personal_data.py: the FLICKR-AES ratings and test-worker readers, the split by workers
(no test-worker image in generic training), the datasets main_nni.py trains on, and the generated demo."""
from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

import dataset
from imagedata import flickr_aes as fa
import option
from imagedata import personal_data
from dataset import DataError
from training.run_data import build_run_datasets

# The published header has a space after each comma; cells may carry whitespace around them.
PUBLISHED = ("worker, imagePair, score\n"
             "A1, a.jpg, 4\n"
             "A1, b.jpg, 2\n"
             "  A2 ,a.jpg,5 \n"
             "\n"
             "A2, c.jpg, 1\n"
             "A3, c.jpg, 3\n")
SMALL = {"n_generic": 12, "n_workers": 9, "n_test_workers": 3, "test_worker_images": (14, 16), "size": 64}  # conftest


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


# --------------------------------------------------------------------------- the ratings reader

def test_reader_takes_the_published_format(tmp_path):
    table = fa.read_ratings(write(tmp_path / fa.RATINGS_CSV, PUBLISHED))
    assert table["worker"].tolist() == ["A1", "A1", "A2", "A2", "A3"]
    assert table["image"].tolist() == ["a.jpg", "b.jpg", "a.jpg", "c.jpg", "c.jpg"]
    assert table["score"].tolist() == [4.0, 2.0, 5.0, 1.0, 3.0]
    assert table["row"].tolist() == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("row, expected", [
    ("A4, d.jpg\n", "row 3 has 2 cells, the header 3"),
    ("A4, d.jpg, 4, 5\n", "row 3 has 4 cells"),
    ("A4, , 4\n", "row 3: the imagePair cell is empty"),
    (", d.jpg, 4\n", "row 3: the worker cell is empty"),
    ("A4, d.jpg, \n", "row 3: the score cell is empty"),
    ("A4, d.jpg, good\n", "row 3 (worker 'A4', image 'd.jpg'): score 'good' is not a number"),
    ("A4, d.jpg, 6\n", "score '6' is not a rating of FLICKR-AES's scale (a whole number 1..5)"),
    ("A4, d.jpg, 0\n", "score '0' is not a rating"),
    ("A4, d.jpg, 3.5\n", "score '3.5' is not a rating"),
    ("A4, d.jpg, nan\n", "score 'nan' is not a rating"),
    ("A1, a.jpg, 3\n", "row 3: worker 'A1' rates image 'a.jpg' a second time (first in row 1)"),
    ("A4, d\x07.jpg, 3\n", "row 3: the imagePair cell has control characters"),
    ('"a,b", d.jpg, 3\n', "row 3: worker 'a,b' is not a worker id (it has spaces, commas or control characters)"),
    ("A 4, d.jpg, 3\n", "row 3: worker 'A 4' is not a worker id"),
])
def test_reader_refuses_a_bad_row_naming_file_and_row(tmp_path, row, expected):
    path = write(tmp_path / fa.RATINGS_CSV, "worker, imagePair, score\nA1, a.jpg, 4\nA2, a.jpg, 2\n" + row)
    with pytest.raises(DataError) as err:
        fa.read_ratings(path)
    assert str(path) in str(err.value) and expected in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("text, expected", [
    ("worker, image, score\nA1, a.jpg, 4\n", "missing column(s) imagePair"),
    ("worker, imagePair, score\n", "has a header but no ratings"),
    ("", "is empty"),
    ("worker, imagePair, score, score\nA1, a.jpg, 4, 4\n", "appears twice in the header"),
])
def test_reader_refuses_bad_files(tmp_path, text, expected):
    path = write(tmp_path / "r.csv", text)
    with pytest.raises(DataError, match=re.escape(expected)):
        fa.read_ratings(path)


def test_reader_reads_within_the_project_limits(tmp_path):
    path = write(tmp_path / "r.csv", "worker, imagePair, score\n")
    with open(path, "r+b") as f:
        f.truncate(dataset.MAX_CSV_BYTES + 1)  # sparse: no disk space used
    with pytest.raises(DataError, match="is larger than"):
        fa.read_ratings(path)
    long = write(tmp_path / "long.csv", "worker, imagePair, score\nA1, " + "x" * (dataset.MAX_CSV_LINE + 10) + ", 3\n")
    with pytest.raises(DataError, match="line 2 is .* bytes long"):
        fa.read_ratings(long)


def test_reader_names_a_missing_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        fa.read_ratings(tmp_path / "none.csv")


# --------------------------------------------------------------------------- the test-worker list

@pytest.mark.parametrize("text", [
    "A1\nA3\n",
    "# the test workers\n\n A1 \nA3\n",
    "worker\nA1\nA3\n",
    "worker, images\nA1, 120\n A3 , 140\n",
    "n, worker\n1, A1\n2, A3\n",
    "# the published split\nworker\nA1\nA3\n",
])
def test_worker_list_one_per_line_or_a_csv_with_a_worker_column(tmp_path, text):
    assert fa.read_test_workers(write(tmp_path / "w.txt", text)) == ["A1", "A3"]


@pytest.mark.parametrize("text, expected", [
    ("", "lists no workers"),
    ("# nobody\n\n", "lists no workers"),
    ("A1\nA2\nA1\n", "line 3 repeats worker 'A1' (first at line 1)"),
    ("A1\nA2 A3\n", "line 2: worker 'A2 A3' is not a worker id (it has spaces, commas or control characters)"),
    ("worker\nA1\n\"a,b\"\n", "row 2: worker 'a,b' is not a worker id (it has spaces, commas or control characters)"),
    ("worker, n\nA1, 1\n, 2\n", "row 2 has an empty worker id"),
    ("worker\nA1\nA1\n", "row 2 repeats worker 'A1'"),
])
def test_worker_list_refuses_bad_lists(tmp_path, text, expected):
    path = write(tmp_path / "w.txt", text)
    with pytest.raises(DataError) as err:
        fa.read_test_workers(path)
    assert str(path) in str(err.value) and expected in str(err.value)
    assert "give a CSV" not in str(err.value)  # a CSV would not take these either


# --------------------------------------------------------------------------- the split by workers

def test_split_keeps_every_test_worker_image_out_of_generic_training(tmp_path):
    ratings = fa.read_ratings(write(tmp_path / fa.RATINGS_CSV, PUBLISHED))
    split = fa.split_by_workers(ratings, ["A3"], ratings_csv=tmp_path / fa.RATINGS_CSV)
    assert split.training_workers == ("A1", "A2")
    assert split.generic["image"].tolist() == ["a.jpg", "b.jpg"]  # c.jpg: A3 rated it, so A2's rating is unused
    assert split.generic["score"].tolist() == [4.5, 2.0]  # the mean over training workers
    assert split.test["image"].tolist() == ["c.jpg"] and split.test["score"].tolist() == [2.0]  # all raters
    assert split.personal["A3"]["image"].tolist() == ["c.jpg"] and split.personal["A3"]["score"].tolist() == [3.0]


def test_split_refuses_test_workers_who_rated_nothing(tmp_path):
    ratings = fa.read_ratings(write(tmp_path / fa.RATINGS_CSV, PUBLISHED))
    with pytest.raises(DataError, match="1 of its 2 workers rated no image"):
        fa.split_by_workers(ratings, ["A3", "B9"], ratings_csv="r.csv", test_workers_file="w.txt")
    with pytest.raises(DataError, match="no image is rated by training workers alone"):
        fa.split_by_workers(ratings, ["A1", "A2"], ratings_csv="r.csv")


def test_scores_map_onto_1_10_as_score_range_1_5():
    assert fa.to_1_10(np.array([1.0, 3.0, 5.0])).tolist() == [1.0, 5.5, 10.0]
    assert fa.to_1_10(np.array([2.0])).tolist() == dataset.rescale_scores(np.array([2.0]), (1, 5)).tolist()


@pytest.fixture(scope="module")
def small_demo(personal_root):
    return personal_root


def options(root, *extra):
    args = option.build_parser().parse_args(["--dataset", "flickr_aes", "--flickr_dir", str(root), "--test_workers",
                                             str(root / personal_data.TEST_WORKERS_FILE), *extra])
    return option.check_options(option.apply_dataset_defaults(args))


def test_generic_training_and_validation_hold_no_test_worker_image(small_demo, tmp_path):
    sets = build_run_datasets(options(small_demo), split_dir=tmp_path / "split")
    ratings = fa.read_ratings(small_demo / fa.RATINGS_CSV)
    tested = set(ratings.loc[ratings["worker"].isin(fa.read_test_workers(small_demo / "test_workers.txt")), "image"])
    trained = set(sets["train"].names) | set(sets["val"].names)
    assert trained and not trained & tested
    assert set(sets["train"].names).isdisjoint(sets["val"].names)
    assert set(sets["test"].names) == tested
    assert len(trained) == SMALL["n_generic"]
    means = ratings[ratings["image"].isin(trained)].groupby("image")["score"].mean()
    for ds in (sets["train"], sets["val"]):
        expected = 1 + 9 * (means.loc[ds.names].to_numpy() - 1) / 4
        assert np.allclose(ds.targets[:, 0], expected / 10) and np.allclose(ds.scores, expected)
    recorded = pd.read_csv(tmp_path / "split" / "val_split.csv")
    assert recorded["image"].tolist() == sets["val"].names
    assert {p.split("/")[-2] for p in sets["test"].paths} == {fa.IMAGE_FOLDER}


def test_validation_test_gives_the_reference_protocol(small_demo):
    sets = build_run_datasets(options(small_demo, "--validation", "test"))
    assert sets["val"].names == sets["test"].names
    assert len(sets["train"]) == SMALL["n_generic"]


@pytest.mark.parametrize("argv, expected", [
    (["--dataset", "flickr_aes", "--flickr_dir", "x"], "needs --test_workers FILE"),
    (["--dataset", "flickr_aes", "--test_workers", "x"], "needs --flickr_dir"),
    (["--dataset", "flickr_aes", "--flickr_dir", "x", "--test_workers", "y", "--variant", "ava"], "--variant tad66k"),
])
def test_options_say_what_flickr_aes_needs(argv, expected):
    args = option.apply_dataset_defaults(option.build_parser().parse_args(argv))
    with pytest.raises(ValueError, match=expected):
        option.check_options(args)


def test_missing_images_folder_is_named(small_demo, tmp_path):
    with pytest.raises(DataError, match="pass --path_to_images"):
        fa.image_folder(tmp_path)
    assert fa.image_folder(small_demo) == small_demo / fa.IMAGE_FOLDER


# --------------------------------------------------------------------------- the generated demo

def test_demo_is_in_the_published_format_and_deterministic(small_demo, tmp_path):
    text = (small_demo / fa.RATINGS_CSV).read_text(encoding="utf-8")
    assert text.startswith("worker, imagePair, score\n")
    ratings = fa.read_ratings(small_demo / fa.RATINGS_CSV)
    assert (ratings.groupby("image").size() == personal_data.RATERS_PER_IMAGE).all()
    means = dict(line.split() for line in (small_demo / fa.MEAN_SCORES_TXT).read_text().splitlines())
    assert set(means) == set(ratings["image"])
    test_workers = fa.read_test_workers(small_demo / personal_data.TEST_WORKERS_FILE)
    assert len(test_workers) == SMALL["n_test_workers"]
    per_image = ratings[ratings["worker"].isin(test_workers)].groupby("image").size()
    assert (per_image == 1).all()  # as in FLICKR-AES, one test worker among an image's raters
    again = personal_data.ensure_personal_dataset(tmp_path / "again", **SMALL)
    for name in (fa.RATINGS_CSV, fa.MEAN_SCORES_TXT, personal_data.TEST_WORKERS_FILE):
        assert (again / name).read_bytes() == (small_demo / name).read_bytes()
    assert sorted(p.name for p in (again / fa.IMAGE_FOLDER).iterdir()) == \
        sorted(p.name for p in (small_demo / fa.IMAGE_FOLDER).iterdir())


def test_demo_workers_have_tastes_that_depart_from_the_mean():
    # a flower lover rates a flower above an equal architecture photo; a soft-focus lover rates blur up
    plain = {"exposure": 0.5, "saturation": 0.5, "blur": 0.5}
    flower = personal_data.TASTES["loves flower"]
    assert personal_data.rating(0.4, flower(theme="flower", **plain), 0.5, 0.0) > \
        personal_data.rating(0.4, flower(theme="architecture", **plain), 0.5, 0.0)
    soft = personal_data.TASTES["soft focus"]
    assert soft(theme="mono", exposure=0.5, saturation=0.0, blur=1.0) > soft(theme="mono", exposure=0.5,
                                                                             saturation=0.0, blur=0.0)
    assert personal_data.rating(1.0, 1.0, 0.5, 0.0) == 5 and personal_data.rating(0.0, 0.0, 0.5, 0.0) == 1


def test_demo_parameters_are_checked(tmp_path):
    with pytest.raises(ValueError, match="n_workers must be an integer >= 8"):
        personal_data.ensure_personal_dataset(tmp_path, n_workers=5, n_test_workers=3)
    with pytest.raises(ValueError, match="LOW <= HIGH"):
        personal_data.ensure_personal_dataset(tmp_path, test_worker_images=(20, 10))


def test_demo_generation_leaves_a_flickr_aes_folder_as_it_was(tmp_path):
    """The real FLICKR-AES names (40K/farm*_b.jpg, its CSV and score list) in a folder the generator did
    not make: refused with one line naming the folder and the first such file (a folder's own files before
    its subfolders'); nothing touched."""
    root = tmp_path / "FLICKR-AES"
    (root / fa.IMAGE_FOLDER).mkdir(parents=True)
    (root / fa.IMAGE_FOLDER / "farm1_255_19451034153_6d1a7f0a5c_b.jpg").write_bytes(b"a photo")
    write(root / fa.RATINGS_CSV, PUBLISHED)
    write(root / fa.MEAN_SCORES_TXT, "a.jpg 4.5\n")
    write(root / personal_data.TEST_WORKERS_FILE, "A1\n")
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}
    with pytest.raises(ValueError) as err:
        personal_data.ensure_personal_dataset(root, **SMALL)
    message = str(err.value)
    assert "\n" not in message and f"{root} holds {fa.RATINGS_CSV}, which personal_data.py did not write" in message
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()} == before
