"""Nothing let in: untrusted checkpoints, downloads over TLS, hostile images, CSVs and names, and
non-finite numbers give one clear error (exit 1 from main_nni, a one-line message naming the
file, row or image), never a traceback, a hang, a silent wrong number or code run from a file.

main_nni runs in-process on a tiny stand-in for TANet (tests/reliability_helpers.py): what is
tested here happens before or around the model.
"""
from __future__ import annotations

import http.server
import io
import json
import os
import pathlib
import shutil
import ssl
import struct
import subprocess
import threading
import zlib
from datetime import timedelta

import numpy as np
import pytest
import requests
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import dataset as ds
from imagedata import images
from helpers import download
from training import engine
import main_nni
from helpers import safe_io
from dataset import DataError
from training.engine import NonFiniteError
from reliability_helpers import MarkerPayload, TinyTANet, write_csv_data

FUZZ = settings(max_examples=80, deadline=timedelta(seconds=5), derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


# --------------------------------------------------------------------------- a tiny CSV data set

@pytest.fixture
def data(tmp_path):
    """image,score CSVs of 6 images (3 themes) and their folder."""
    return write_csv_data(tmp_path, 6, "abc")


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setattr(main_nni, "TANet", TinyTANet)


def argv_for(data: pathlib.Path, out: pathlib.Path, *extra: str) -> list[str]:
    return ["--dataset", "csv", "--train_csv", str(data / "train.csv"), "--test_csv", str(data / "test.csv"),
            "--path_to_images", str(data / "images"), "--backbones", "random", "--batch_size", "2",
            "--num_epoch", "1", "--num_workers", "0", "--device", "cpu", "--quiet", "--no_report",
            "--experiment_dir_name", str(out), *extra]


def one_line_error(capsys, argv: list[str]) -> str:
    """Run main_nni; it must exit 1 with exactly one error line, the last, and no traceback."""
    code = main_nni.main(argv)
    err = capsys.readouterr().err
    assert code == 1, err
    assert "Traceback" not in err and "Logging error" not in err, err
    lines = err.strip().splitlines()
    assert [line for line in lines if " error: " in line] == lines[-1:], err
    return lines[-1]


def save_tiny_checkpoint(path: pathlib.Path, **extra) -> None:
    torch.manual_seed(0)
    torch.save({"model": TinyTANet("tad66k").state_dict(), "variant": "tad66k", **extra}, path)


# --------------------------------------------------------------------------- untrusted checkpoints

def test_code_running_weight_file_is_refused_by_main_and_never_runs(data, tmp_path, tiny, capsys):
    marker, evil = tmp_path / "pwned", tmp_path / "evil.pth"
    save_tiny_checkpoint(evil, note=MarkerPayload(marker))
    line = one_line_error(capsys, argv_for(data, tmp_path / "out", "--test_only", "--path_to_model_weight", str(evil)))
    assert str(evil) in line and "--allow_unsafe_load" in line
    assert not marker.exists()
    assert not (tmp_path / "out" / "results.json").exists()


def test_code_running_weight_file_loads_with_the_opt_in_and_says_so(data, tmp_path, tiny):
    marker, evil = tmp_path / "pwned", tmp_path / "evil.pth"
    save_tiny_checkpoint(evil, note=MarkerPayload(marker))
    with pytest.warns(UserWarning, match="--allow_unsafe_load: unpickling .*evil.pth.*arbitrary code"):
        code = main_nni.main(argv_for(data, tmp_path / "out", "--test_only", "--path_to_model_weight", str(evil),
                                      "--allow_unsafe_load"))
    assert code == 0 and marker.exists()
    assert json.loads((tmp_path / "out" / "results.json").read_text())["n_images"] == 6


def test_code_running_last_checkpoint_in_a_run_folder_is_refused_on_resume(data, tmp_path, tiny, capsys):
    out, marker = tmp_path / "out", tmp_path / "pwned"
    assert main_nni.main(argv_for(data, out)) == 0
    ckpt = safe_io.safe_torch_load(out / "last.pth")
    torch.save({**ckpt, "note": MarkerPayload(marker)}, out / "last.pth")  # planted by someone else
    line = one_line_error(capsys, argv_for(data, out, "--resume", "--num_epoch", "2", "--allow_unsafe_load"))
    assert "last.pth" in line and "arbitrary code" in line
    assert not marker.exists()


def _truncated(path: pathlib.Path) -> bytes:
    save_tiny_checkpoint(path)
    return path.read_bytes()[: path.stat().st_size // 2]


@pytest.mark.parametrize("kind,content", [
    ("empty", b""),
    ("truncated", None),
    ("text", b"these are not weights\n"),
    ("json", b'{"model": {}}'),
    ("zip that is not torch", b"PK\x05\x06" + b"\x00" * 18),
    ("numpy file", b"\x93NUMPY\x01\x00v\x00{'descr': '<f4', 'fortran_order': False, 'shape': (2,), }"),
])
def test_broken_weight_files_fail_with_one_clear_line(data, tmp_path, tiny, capsys, kind, content):
    path = tmp_path / "weights.pth"
    path.write_bytes(_truncated(path) if content is None else content)
    line = one_line_error(capsys, argv_for(data, tmp_path / "out", "--test_only", "--path_to_model_weight", str(path)))
    assert str(path) in line, line


def test_weights_of_another_model_fail_with_one_clear_line(data, tmp_path, tiny, capsys):
    path = tmp_path / "other.pth"
    torch.save({"model": {"conv.weight": torch.zeros(2, 2)}}, path)
    line = one_line_error(capsys, argv_for(data, tmp_path / "out", "--test_only", "--path_to_model_weight", str(path)))
    assert "does not fit" in line and "other.pth" in line


# --------------------------------------------------------------------------- downloads: TLS stays on

def test_download_never_turns_tls_verification_off(monkeypatch, tmp_path):
    seen = []

    def fake_get(url, **kwargs):
        seen.append(kwargs)
        raise requests.exceptions.ConnectionError("offline")

    monkeypatch.setattr(requests, "get", fake_get)
    with pytest.raises(download.DownloadError):
        download.download("https://example.invalid/w.pth", tmp_path / "w.pth", progress=False)
    assert seen and all(kwargs.get("verify", True) is True for kwargs in seen)


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory):
    """An HTTPS server on 127.0.0.1 with a self-signed certificate: (url, certificate file)."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a certificate")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)

    class Handler(http.server.BaseHTTPRequestHandler):
        timeout = 5

        def do_GET(self):  # noqa: N802 - http.server API
            self.send_response(200)
            self.send_header("Content-Length", "7")
            self.end_headers()
            self.wfile.write(b"weights")

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{httpd.server_address[1]}/w.pth", cert
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def test_download_refuses_a_server_whose_certificate_does_not_verify(tls_server, tmp_path, monkeypatch):
    url, cert = tls_server
    for name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    dest = tmp_path / "w.pth"
    with pytest.raises(download.DownloadError, match="TLS certificate could not be verified") as info:
        download.download(url, dest, progress=False)
    assert url in str(info.value) and "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []
    # the same server, trusted through the CA bundle: the refusal above was the verification
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(cert))
    assert download.download(url, dest, progress=False).read_bytes() == b"weights"


# --------------------------------------------------------------------------- hostile images

def _chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height RGB pixels."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + _chunk(b"IEND", b""))


def _encoded(fmt: str, mode: str = "RGB", size=(8, 8)) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, 90).save(buf, fmt)
    return buf.getvalue()


def jpeg_claiming(width: int, height: int) -> bytes:
    data = bytearray(_encoded("JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def gif_claiming(width: int, height: int) -> bytes:
    data = bytearray(_encoded("GIF", "P"))
    data[6:10] = struct.pack("<HH", width, height)  # logical screen
    frame = data.index(b"\x2c", 13)
    data[frame + 5:frame + 9] = struct.pack("<HH", width, height)  # the image
    return bytes(data)


def bmp_claiming(width: int, height: int) -> bytes:
    data = bytearray(_encoded("BMP"))
    data[18:26] = struct.pack("<ii", width, height)
    return bytes(data)


CLAIMING = {"png": png_claiming, "jpg": jpeg_claiming, "gif": gif_claiming, "bmp": bmp_claiming}


@pytest.mark.parametrize("fmt", CLAIMING)
@pytest.mark.parametrize("width,height", [(100_000, 100_000), (65_535, 65_535), (12_000, 8_000)])
def test_images_claiming_huge_sizes_are_refused_as_decompression_bombs(tmp_path, fmt, width, height):
    if fmt in ("jpg", "gif") and max(width, height) > 65_535:
        width = height = 65_535  # the largest these formats can say
    path = tmp_path / f"huge.{fmt}"
    path.write_bytes(CLAIMING[fmt](width, height))
    with pytest.raises(DataError, match=rf"huge\.{fmt} refused as a possible decompression bomb"):
        images.load_image(path)


@pytest.mark.parametrize("fmt", CLAIMING)
@pytest.mark.parametrize("width,height", [(0, 8), (8, 0), (0, 0)])
def test_images_of_zero_size_are_refused(tmp_path, fmt, width, height):
    path = tmp_path / f"zero.{fmt}"
    path.write_bytes(CLAIMING[fmt](width, height))
    with pytest.raises(DataError, match=rf"zero\.{fmt}"):
        images.load_image(path)


def _check_load(path: pathlib.Path) -> None:
    """load_image either gives a non-empty RGB image or raises DataError naming the file."""
    try:
        img = images.load_image(path)
    except DataError as exc:
        assert path.name in str(exc)
        return
    assert img.mode == "RGB" and img.width >= 1 and img.height >= 1


@FUZZ
@given(content=st.binary(max_size=2048))
def test_random_bytes_are_an_image_or_a_data_error(tmp_path, content):
    path = tmp_path / "fuzz.img"
    path.write_bytes(content)
    _check_load(path)


SEEDS = [_encoded("PNG"), _encoded("PNG", "RGBA"), _encoded("JPEG"), _encoded("GIF", "P"), _encoded("BMP"),
         _encoded("TIFF"), _encoded("WEBP"), _encoded("PPM"), _encoded("PNG", "I;16"), _encoded("TIFF", "F")]


@FUZZ
@given(seed=st.sampled_from(SEEDS), cut=st.floats(0.0, 1.0),
       flips=st.lists(st.tuples(st.floats(0.0, 1.0, exclude_max=True), st.integers(0, 255)), max_size=8))
def test_damaged_images_of_every_format_are_an_image_or_a_data_error(tmp_path, seed, cut, flips):
    data = bytearray(seed)
    for where, value in flips:
        data[int(where * len(data))] = value
    path = tmp_path / "damaged.img"
    path.write_bytes(bytes(data[: max(1, round(cut * len(data)))]))
    _check_load(path)


# --------------------------------------------------------------------------- hostile CSVs

HOSTILE_CELLS = st.one_of(
    st.sampled_from(["", " ", "nan", "NaN", "inf", "-inf", "1e400", "-0", "10.0000001", "99999999999999999999",
                     "9007199254740993", "1e20", "-3", "2.5e-1", "0x10", "1_000", "../x.jpg", "/etc/passwd",
                     "\"q,uoted\"", "\"", "''", "\\", "#", "a\x00b", "é.jpg"]),
    st.integers(-10, 10 ** 20).map(str),
    st.integers(2 ** 50, 10 ** 22).map(str),  # beyond what float64 holds exactly
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.text(max_size=8),
)
PLAUSIBLE = {"image": st.integers(0, 30).map(lambda i: f"{i}.jpg"), "image_id": st.integers(0, 10 ** 6).map(str),
             "score": st.one_of(st.integers(1, 10).map(str), st.floats(1, 10).map(repr)), "theme": st.text(max_size=6)}
VOTES = st.integers(0, 300).map(str)
SCORE_HEADERS = [["image", "score"], ["image", "score", "theme"], ["score", "image"], ["image", "score", "image"]]
AVA_HEADERS = [list(ds.AVA_COLUMNS), list(ds.AVA_COLUMNS), list(ds.AVA_COLUMNS), ["image_id", *ds.AVA_VOTE_COLUMNS]]


def rarely(draw) -> bool:
    return draw(st.integers(0, 9)) == 7  # hypothesis draws 0 (and 9) far more often than 1 in 10


@st.composite
def csv_texts(draw, headers: list[list[str]]) -> bytes:
    """CSV files of plausible rows (so that they get past the first checks) with hostile cells,
    rows of the wrong length, other separators and line ends."""
    header = draw(st.sampled_from(headers))
    rows = draw(st.lists(st.tuples(*[PLAUSIBLE.get(name, VOTES) for name in header]).map(list), max_size=5))
    for _ in range(draw(st.integers(0, 3)) if rows else 0):
        row = rows[draw(st.integers(0, len(rows) - 1))]
        row[draw(st.integers(0, len(row) - 1))] = draw(HOSTILE_CELLS)
    if rows and rarely(draw):
        rows[-1] = rows[-1][:-1] if rarely(draw) else [*rows[-1], draw(HOSTILE_CELLS)]
    sep = draw(st.sampled_from([";", "\t"])) if rarely(draw) else ","
    eol = draw(st.sampled_from(["\n", "\r\n", "\r"]))
    text = eol.join(sep.join(row) for row in [header, *rows]) + draw(st.sampled_from(["", eol, eol * 3]))
    return draw(st.sampled_from(["", "\ufeff"])).encode() + text.encode("utf-8", "surrogatepass")


ANY_BYTES = st.one_of(st.binary(max_size=300), st.text(max_size=300).map(lambda t: t.encode("utf-8", "surrogatepass")))


def _check_score_frame(df) -> None:
    assert list(df.columns[:2]) == ["image", "score"] and len(df) >= 1
    assert df["image"].is_unique and (df["image"].str.strip() != "").all()
    assert np.isfinite(df["score"]).all() and df["score"].between(1, 10).all()


def _check_ava_frame(df) -> None:
    votes = df[list(ds.AVA_VOTE_COLUMNS)].to_numpy()
    assert len(df) >= 1 and df["image_id"].is_unique
    assert (votes >= 0).all() and (votes.sum(axis=1) > 0).all() and (votes < 2 ** 53).all()
    assert (df[list(ds.AVA_TAG_COLUMNS)].to_numpy() >= 0).all()


def _read_or_refuse(path: pathlib.Path, read, check) -> None:
    try:
        frame = read(path)
    except DataError as exc:
        assert path.name in str(exc) and "\n" not in str(exc).strip()
    else:
        check(frame)


@FUZZ
@given(content=csv_texts(SCORE_HEADERS))
def test_hostile_score_csvs_are_read_validated_or_refused_with_a_data_error(tmp_path, content):
    path = tmp_path / "hostile.csv"
    path.write_bytes(content)
    _read_or_refuse(path, ds.read_score_csv, _check_score_frame)


@settings(FUZZ, max_examples=120)
@given(content=csv_texts(AVA_HEADERS))
@pytest.mark.slow
def test_hostile_ava_csvs_are_read_validated_or_refused_with_a_data_error(tmp_path, content):
    path = tmp_path / "hostile.csv"
    path.write_bytes(content)
    _read_or_refuse(path, ds.read_ava_csv, _check_ava_frame)


@settings(FUZZ, max_examples=50)
@given(content=ANY_BYTES)
def test_random_bytes_as_a_csv_are_refused_with_a_data_error(tmp_path, content):
    path = tmp_path / "hostile.csv"
    path.write_bytes(content)
    _read_or_refuse(path, ds.read_score_csv, _check_score_frame)
    _read_or_refuse(path, ds.read_ava_csv, _check_ava_frame)


@pytest.mark.parametrize("count", ["99999999999999999999", "1e300", "9007199254740993"])
def test_ava_vote_counts_too_large_to_hold_exactly_are_refused(tmp_path, count):
    path = tmp_path / "ava.csv"
    header = ",".join(ds.AVA_COLUMNS)
    path.write_text(f"{header}\n7,{count},1,1,1,1,1,1,1,1,1,0,0,0\n")
    with pytest.raises(DataError, match=r"ava\.csv: row 1 \('7'\): vote count score2 .* too large"):
        ds.read_ava_csv(path)


# --------------------------------------------------------------------------- hostile names

NAME_PARTS = st.sampled_from(["a", "b.jpg", ".", "..", "...", "/", "//", "\\", " ", "~", "..a", "a..", "C:", "%2e%2e"])


@FUZZ
@given(name=st.lists(NAME_PARTS, min_size=1, max_size=8).map("".join))
def test_image_names_never_resolve_outside_the_image_folder(tmp_path, name):
    folder = tmp_path / "images"
    try:
        path = ds.resolve_image_path(folder, name)
    except DataError as exc:
        assert "outside the image folder" in str(exc) or "absolute path" in str(exc)
        assert ds.resolve_image_path(folder, name, allow_outside=True) == folder / name
        return
    inside = os.path.normpath(path)
    assert os.path.commonpath([inside, str(folder)]) == str(folder), f"{name!r} -> {inside}"


@pytest.mark.parametrize("name", ["../secret.jpg", "sub/../../secret.jpg", "/etc/passwd"])
def test_a_csv_naming_files_outside_the_image_folder_stops_main_with_one_line(data, tmp_path, tiny, capsys, name):
    (data / "secret.jpg").write_bytes((data / "images" / "im0.jpg").read_bytes())
    text = (data / "test.csv").read_text().replace("im3.jpg", name)
    (data / "test.csv").write_text(text)
    line = one_line_error(capsys, argv_for(data, tmp_path / "out"))
    assert "test.csv: row 4" in line and repr(name) in line
    assert "outside the image folder" in line or "absolute path" in line


def test_a_csv_that_is_not_utf8_stops_main_with_one_line(data, tmp_path, tiny, capsys):
    (data / "test.csv").write_bytes(b"image,score\nim0.jpg,5\ncaf\xe9.jpg,6\n")
    line = one_line_error(capsys, argv_for(data, tmp_path / "out"))
    assert "test.csv: line 3 is not valid UTF-8" in line


@pytest.mark.parametrize("workers", ["0", "1"])
def test_a_corrupt_image_stops_main_with_one_line_naming_it(data, tmp_path, tiny, capsys, workers):
    (data / "images" / "im3.jpg").write_bytes(b"GIF89a but not really")
    line = one_line_error(capsys, argv_for(data, tmp_path / "out", "--num_workers", workers))
    assert "im3.jpg" in line and "not a readable image" in line
    assert "DataLoader worker" not in line


def test_an_output_folder_that_is_a_file_stops_main_with_one_line(data, tmp_path, tiny, capsys):
    (tmp_path / "taken").write_text("not a folder")
    line = one_line_error(capsys, argv_for(data, tmp_path / "taken"))
    assert "taken" in line
    assert (tmp_path / "taken").read_text() == "not a folder"


def test_an_output_folder_whose_name_is_not_utf8_works(data, tmp_path, tiny, monkeypatch):
    out = pathlib.Path(os.fsdecode(bytes(tmp_path) + b"/caf\xe9"))
    stderr = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="backslashreplace")  # as Python sets it up
    monkeypatch.setattr("sys.stderr", stderr)
    assert main_nni.main(argv_for(data, out)) == 0
    stderr.seek(0)
    err = stderr.read()
    assert "Logging error" not in err and "Traceback" not in err, err
    assert "caf\\udce9" in (out / "train.log").read_text(encoding="utf-8")
    assert json.loads((out / "results.json").read_text())["n_images"] == 6


def test_image_files_whose_names_are_not_utf8_load(tmp_path):
    path = pathlib.Path(os.fsdecode(bytes(tmp_path) + b"/caf\xe9.png"))
    path.write_bytes(_encoded("PNG"))
    assert images.load_image(path).size == (8, 8)
    missing = pathlib.Path(os.fsdecode(bytes(tmp_path) + b"/gon\xe9.png"))
    with pytest.raises(DataError, match="not found"):
        images.load_image(missing)
    with pytest.raises(DataError, match="not valid Unicode"):
        ds.resolve_image_path(tmp_path, missing.name)  # a CSV cannot name it: CSVs are UTF-8


@pytest.mark.parametrize("output", ["scores.csv", "scores.json"])
def test_predict_scores_files_whose_names_are_not_utf8(tmp_path, monkeypatch, output):
    import predict

    monkeypatch.setattr("models.TANet", TinyTANet)  # scoring imports it when it loads a checkpoint
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "ok.png").write_bytes(_encoded("PNG"))
    pathlib.Path(os.fsdecode(bytes(folder) + b"/caf\xe9.png")).write_bytes(_encoded("PNG"))
    save_tiny_checkpoint(tmp_path / "tiny.pth")
    stdout = io.TextIOWrapper(io.BytesIO(), encoding="utf-8")  # strict, as in an en_US.UTF-8 terminal
    monkeypatch.setattr("sys.stdout", stdout)
    code = predict.main([str(folder), "--path_to_model_weight", str(tmp_path / "tiny.pth"), "--num_workers", "0",
                         "--device", "cpu", "--quiet", "--output", str(tmp_path / output)])
    assert code == 0
    assert (tmp_path / output).stat().st_size > 0


# --------------------------------------------------------------------------- non-finite numbers

PATHS = ["/data/a.jpg", "/data/b.jpg", "/data/c.jpg"]


def batch(images: torch.Tensor) -> dict:
    n = images.shape[0]
    return {"image": images, "target": torch.full((n, 1), 0.5), "path": PATHS[:n], "index": torch.arange(n),
            "theme": ["t"] * n, "score": torch.full((n,), 5.0)}


def images_with(bad: float, at: int) -> torch.Tensor:
    images = torch.zeros(3, 3, 224, 224)
    images[at, 1, 5, 7] = bad
    return images


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_input_is_caught_naming_the_image(bad):
    model = TinyTANet("tad66k")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(NonFiniteError, match=r"non-finite input in epoch 4, batch 0; image\(s\): /data/b.jpg$"):
        engine.train_one_epoch(model, [batch(images_with(bad, 1))], optimizer, torch.nn.MSELoss(),
                               torch.device("cpu"), epoch=4, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "a bad batch changed the model"
    with pytest.raises(NonFiniteError, match=r"non-finite input in val; image\(s\): /data/c.jpg$"):
        engine.infer(model, [batch(images_with(bad, 2))], torch.device("cpu"), progress=False, desc="val")


class BlowsUpOn(torch.nn.Module):
    """Gives NaN for images whose mean is above 1, 0.5 for the others."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))

    def forward(self, x):
        bad = x.mean(dim=(1, 2, 3)) > 1
        return torch.where(bad, torch.full_like(self.w, float("nan")), torch.sigmoid(self.w * 0))[:, None].expand(-1, 1)


def test_non_finite_prediction_is_caught_naming_the_image_that_caused_it():
    images = torch.zeros(3, 3, 224, 224)
    images[0] += 2
    with pytest.raises(NonFiniteError, match=r"non-finite prediction in test; image\(s\): /data/a.jpg$"):
        engine.infer(BlowsUpOn(), [batch(images)], torch.device("cpu"), progress=False, desc="test")
    model = BlowsUpOn()
    with pytest.raises(NonFiniteError, match=r"non-finite prediction in epoch 0, batch 0; image\(s\): /data/a.jpg$"):
        engine.train_one_epoch(model, [batch(images)], torch.optim.SGD(model.parameters(), lr=0.1),
                               torch.nn.MSELoss(), torch.device("cpu"), progress=False)


def nan_weights(path: pathlib.Path) -> None:
    model = TinyTANet("tad66k")
    with torch.no_grad():
        model.head[1].weight.fill_(float("nan"))
    torch.save({"model": model.state_dict(), "variant": "tad66k"}, path)


def test_model_with_nan_weights_cannot_score_and_main_names_the_images(data, tmp_path, tiny, capsys):
    weights = tmp_path / "nan.pth"
    nan_weights(weights)
    model = TinyTANet("tad66k")
    model.load_state_dict(torch.load(weights)["model"])
    with pytest.raises(NonFiniteError, match=r"prediction in test; image\(s\): /data/a.jpg, /data/b.jpg$"):
        engine.infer(model, [batch(torch.zeros(2, 3, 224, 224))], torch.device("cpu"), progress=False, desc="test")

    line = one_line_error(capsys, argv_for(data, tmp_path / "test", "--test_only", "--path_to_model_weight",
                                           str(weights)))
    assert "non-finite prediction in test" in line and "im0.jpg" in line
    assert not (tmp_path / "test" / "results.json").exists()

    line = one_line_error(capsys, argv_for(data, tmp_path / "train", "--path_to_model_weight", str(weights)))
    assert "non-finite prediction in epoch 0, batch 0" in line and ".jpg" in line
    assert not (tmp_path / "train" / "last.pth").exists()
