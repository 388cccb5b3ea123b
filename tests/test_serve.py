"""serve.py and webapp/: the JSON API against Scorer, bad uploads, limits, concurrency, the page in a
headless Chromium, and the command line. Needs requirements-deploy.txt (skipped without it)."""
from __future__ import annotations

import asyncio
import contextlib
import csv
import json
import io
import logging
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import tracemalloc
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from PIL import Image

REASON = "the web extra is not installed: pip install -r requirements-deploy.txt"
pytest.importorskip("fastapi", reason=REASON)
uvicorn = pytest.importorskip("uvicorn", reason=REASON)
pytest.importorskip("python_multipart", reason=REASON)

from starlette.requests import Request  # noqa: E402

import serve  # noqa: E402
from models import TANet  # noqa: E402
from models import get_pretrained_cfg  # noqa: E402
from scoring import Scorer, output_columns, write_results  # noqa: E402
from webapp import Limits, create_app  # noqa: E402
from webapp.uploads import UploadError, body_limit, human_bytes, label, read_uploads  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
LIMITS = Limits(max_file_bytes=200_000, max_files=4, slots=1, queue=3)
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")

pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------- inputs

def photo(path: Path, seed: int, size=(160, 120)) -> Path:
    """A smooth photo-like JPEG with its own colours."""
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w] / max(w, h)
    a, b = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    pixels = a * (1 - x[..., None]) + b * y[..., None] + rng.normal(0, 12, (h, w, 3))
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB").save(path, quality=90)
    return path


def bomb_png(width: int = 20000, height: int = 20000) -> bytes:
    """A small PNG whose header claims 400 million pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 4096))
            + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    return [photo(root / f"photo{i}.jpg", seed=i) for i in range(3)]


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, photos):
    """name -> bytes of each kind of bad upload."""
    full = photo(tmp_path_factory.mktemp("full") / "full.jpg", seed=9, size=(400, 300)).read_bytes()
    return {
        "notes.jpg": b"these are my notes, not a photo\n",
        "cut.jpg": full[: len(full) // 2],
        "bomb.png": bomb_png(),
        "huge.jpg": np.random.default_rng(0).integers(0, 256, LIMITS.max_file_bytes + 50_000, np.uint8).tobytes(),
        "empty.jpg": b"",
    }


# --------------------------------------------------------------------------- servers

def _checkpoint(folder: Path, variant: str) -> Path:
    torch.manual_seed(0)
    path = folder / f"{variant}.pth"
    torch.save({"model": TANet(variant).state_dict(), "variant": variant}, path)
    return path


class Server:
    """A uvicorn server of the app on a free port, in a thread."""

    def __init__(self, app) -> None:
        sock = serve.bind("127.0.0.1", 0)
        self.url = serve.url_of("127.0.0.1", sock.getsockname()[1])
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the test server did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def _serve(folder: Path, variant: str):
    ckpt = _checkpoint(folder, variant)
    scorer = Scorer(ckpt, device="cpu")
    server = Server(create_app(scorer, LIMITS))
    return server, scorer, ckpt


@pytest.fixture(scope="module")
def ava(tmp_path_factory):
    server, scorer, ckpt = _serve(tmp_path_factory.mktemp("ava"), "ava")
    yield server, scorer, ckpt
    server.stop()


@pytest.fixture(scope="module")
def tad(tmp_path_factory):
    server, scorer, ckpt = _serve(tmp_path_factory.mktemp("tad"), "tad66k")
    yield server, scorer, ckpt
    server.stop()


def post_files(url: str, files: list[tuple[str, bytes]], field: str = "files", **kwargs) -> requests.Response:
    return requests.post(url, files=[(field, (name, data)) for name, data in files], timeout=60, **kwargs)


def assert_up(server: Server) -> None:
    answer = requests.get(f"{server.url}/api/health", timeout=10)
    assert answer.status_code == 200 and answer.json()["status"] == "ok"


# --------------------------------------------------------------------------- the API

def test_health_tells_the_model_its_preprocessing_and_the_limits(ava):
    server, scorer, ckpt = ava
    for path in ("/api/health", "/api/info"):
        info = requests.get(server.url + path, timeout=10).json()
        assert info["variant"] == "ava" and info["checkpoint"] == ckpt.name == "ava.pth"
        assert info["device"] == "cpu" and info["theme_fusion"] == "isolated"
        assert info["preprocessing"] == get_pretrained_cfg("ava").preprocessing
        assert info["limits"] == {"max_file_bytes": 200_000, "max_files": 4, "slots": 1, "queue": 3,
                                  "max_pixels": 200_000_000, "body_timeout": 60.0}
        assert info["columns"] == output_columns("ava") and info["attention"] is True


@pytest.mark.parametrize("which", ["ava", "tad"])
def test_results_have_predicts_fields_and_equal_score_detailed(which, request, photos):
    server, scorer, _ = request.getfixturevalue(which)
    answer = post_files(f"{server.url}/api/score", [(p.name, p.read_bytes()) for p in photos])
    assert answer.status_code == 200
    body = answer.json()
    assert body["variant"] == scorer.variant
    rows = body["results"]
    expected = scorer.score_detailed([str(p) for p in photos])
    assert [list(row) for row in rows] == [output_columns(scorer.variant)] * len(photos)
    assert [row["image"] for row in rows] == [p.name for p in photos]
    for row, want in zip(rows, expected):
        assert row["error"] == "" and want.error is None
        assert abs(row["score"] - want.score) <= 1e-6
        if scorer.variant == "ava":
            assert abs(row["std"] - want.std) <= 1e-6
            assert np.allclose([row[f"p{k}"] for k in range(1, 11)], want.distribution, atol=1e-6, rtol=0)
            assert abs(sum(row[f"p{k}"] for k in range(1, 11)) - 1) < 1e-5
    assert len({row["score"] for row in rows}) == len(rows)  # the photos differ, and so do their scores


def test_a_score_does_not_depend_on_the_other_files_of_the_request(ava, photos):
    server, _, _ = ava
    alone = post_files(f"{server.url}/api/score", [(photos[1].name, photos[1].read_bytes())]).json()["results"][0]
    together = post_files(f"{server.url}/api/score", [(p.name, p.read_bytes()) for p in photos]).json()["results"]
    assert abs(alone["score"] - together[1]["score"]) <= 1e-6


def test_every_bad_file_gets_its_own_error_and_the_good_ones_are_scored(ava, photos, bad_files):
    server, scorer, _ = ava
    names = list(bad_files)
    first = post_files(f"{server.url}/api/score", [(photos[0].name, photos[0].read_bytes())]
                       + [(n, bad_files[n]) for n in names[:3]])
    second = post_files(f"{server.url}/api/score", [(n, bad_files[n]) for n in names[3:]])
    assert first.status_code == second.status_code == 200
    rows = {row["image"]: row for row in first.json()["results"] + second.json()["results"]}
    assert rows[photos[0].name]["error"] == ""
    assert abs(rows[photos[0].name]["score"] - scorer.score(str(photos[0]))) <= 1e-6
    expected = {
        "notes.jpg": "image file notes.jpg is not a readable image",
        "cut.jpg": "image file cut.jpg could not be decoded (truncated or corrupt?)",
        "bomb.png": "image file bomb.png refused as a possible decompression bomb",
        "huge.jpg": "image file huge.jpg is 244.1 KB, over the server's limit of 195.3 KB per file",
        "empty.jpg": "image file empty.jpg is empty (0 bytes)",
    }
    for name, message in expected.items():
        row = rows[name]
        assert row["error"].startswith(message), (name, row["error"])
        assert row["score"] is None and row["std"] is None and row["p1"] is None
    assert_up(server)


@pytest.mark.parametrize("send, status, message", [
    (dict(), 415, "send the images as multipart/form-data, each in a field named 'files'"),
    (dict(data=b"", headers={"Content-Type": "multipart/form-data; boundary=xyz"}), 400, "no files in the request"),
    (dict(files=[("photo", ("a.jpg", b"x"))]), 400, "unexpected form field 'photo'"),
    (dict(files=[("files", (f"{i}.jpg", b"x")) for i in range(5)]), 413, "too many files: at most 4 per request"),
    (dict(data=b"--xyz\r\nContent-Disposition: form-data; name=\"files\"; filename=\"a.jpg\"\r\n\r\nabc",
          headers={"Content-Type": "multipart/form-data; boundary=xyz"}), 400, "ends before its closing boundary"),
    (dict(data=b"--xyz\r\nContent-Disposition: form-data; name=\"files\"; filename=\"a.jpg\"\r\n\r\n"
               + b"x" * 1_000_000, headers={"Content-Type": "multipart/form-data; boundary=xyz"}), 413,
     "the request is longer than"),
])
def test_a_request_that_is_not_uploads_gets_a_clear_4xx(ava, send, status, message):
    server, _, _ = ava
    answer = requests.post(f"{server.url}/api/score", timeout=30, **send)
    assert answer.status_code == status and message in answer.json()["detail"], answer.text
    assert_up(server)


def test_a_client_file_name_is_only_a_label(ava, photos):
    server, _, _ = ava
    names = ["../../etc/passwd", "C:\\Users\\me\\été.jpg", "evil\x1b[31m.jpg", ""]
    rows = post_files(f"{server.url}/api/score", [(n, photos[0].read_bytes()) for n in names]).json()["results"]
    assert [r["image"] for r in rows] == ["passwd", "été.jpg", "evil\\x1b[31m.jpg", "file 4"]
    scores = [r["score"] for r in rows]  # the same photo four times: one score, up to float rounding
    assert max(scores) - min(scores) < 1e-5 and all(r["error"] == "" for r in rows)
    assert label(b"x" * 500, 1).endswith("...") and len(label(b"x" * 500, 1)) == 200


def test_twenty_concurrent_requests_are_scored_or_told_busy(ava, photos, monkeypatch):
    """One slot and three queue places: while the first request is held in the model, the other 16
    are refused at once; then the four admitted ones are all scored, and the server is still up."""
    server, scorer, _ = ava
    gate, entered = threading.Event(), threading.Event()
    score_detailed = scorer.score_detailed

    def held(x):
        entered.set()
        assert gate.wait(60)
        return score_detailed(x)

    monkeypatch.setattr(scorer, "score_detailed", held)
    data = photos[2].read_bytes()
    answers: list[requests.Response] = []
    lock = threading.Lock()

    def one(_):
        answer = post_files(f"{server.url}/api/score", [("p.jpg", data)])
        with lock:
            answers.append(answer)

    with ThreadPoolExecutor(20) as pool:
        futures = [pool.submit(one, i) for i in range(20)]
        deadline = time.monotonic() + 60
        while len(answers) < 16 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert entered.wait(60) and len(answers) == 16, len(answers)
        assert {a.status_code for a in answers} == {503}
        gate.set()
        for f in futures:
            f.result(timeout=120)
    monkeypatch.undo()
    busy = [a for a in answers if a.status_code == 503]
    scored = [a for a in answers if a.status_code == 200]
    assert len(busy) == 16 and len(scored) == 4
    assert all(a.json()["detail"].startswith("busy:") and a.headers["Retry-After"] == "1" for a in busy)
    expected = score_detailed([str(photos[2])])[0].score
    assert all(abs(a.json()["results"][0]["score"] - expected) <= 1e-6 for a in scored)
    assert_up(server)
    assert requests.get(f"{server.url}/api/health", timeout=10).json()["admitted"] == 0


def test_twenty_concurrent_requests_without_holding_are_all_answered(tad, photos):
    server, _, _ = tad
    data = photos[1].read_bytes()
    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(lambda _: post_files(f"{server.url}/api/score", [("p.jpg", data)]), range(20)))
    for a in answers:
        assert (a.status_code == 200 and a.json()["results"][0]["error"] == "") or \
            (a.status_code == 503 and a.json()["detail"].startswith("busy:")), a.text
    assert any(a.status_code == 200 for a in answers)
    assert_up(server)


def test_attention_figure_is_a_png_and_a_bad_file_is_refused(ava, photos, bad_files):
    server, _, _ = ava
    answer = post_files(f"{server.url}/api/attention", [(photos[0].name, photos[0].read_bytes())], field="file")
    assert answer.status_code == 200 and answer.headers["content-type"] == "image/png"
    with Image.open(io.BytesIO(answer.content)) as img:
        img.load()
        assert img.size == (1200, 420)
    bad = post_files(f"{server.url}/api/attention", [("notes.jpg", bad_files["notes.jpg"])], field="file")
    assert bad.status_code == 422 and "notes.jpg is not a readable image" in bad.json()["detail"]
    two = post_files(f"{server.url}/api/attention", [("a.jpg", b"1"), ("b.jpg", b"2")], field="file")
    assert two.status_code == 413


def test_csv_is_predicts_csv(ava, photos, bad_files, tmp_path):
    server, scorer, _ = ava
    files = [(p.name, p.read_bytes()) for p in photos[:2]] + [("notes.jpg", bad_files["notes.jpg"])]
    text = post_files(f"{server.url}/api/score?format=csv", files).text
    results = [replace(r, image=Path(r.image).name) for r in scorer.score_detailed([str(p) for p in photos[:2]])]
    write_results(results, tmp_path / "predict.csv", "ava")
    theirs = (tmp_path / "predict.csv").read_text(encoding="utf-8").splitlines()
    ours = text.splitlines()
    assert ours[0] == theirs[0] == ",".join(output_columns("ava")) and len(ours) == 4
    for a, b in zip(csv.DictReader(ours[:3]), csv.DictReader(theirs)):
        assert a["image"] == b["image"] and a["error"] == b["error"] == ""
        assert all(abs(float(a[c]) - float(b[c])) <= 1e-6 for c in output_columns("ava")[1:-1])
    last = next(csv.DictReader([ours[0], ours[3]]))
    assert last["image"] == "notes.jpg" and last["score"] == "" and last["p10"] == ""
    assert last["error"].startswith("image file notes.jpg is not a readable image")
    # the page's download: the JSON results sent back give the same CSV
    rows = post_files(f"{server.url}/api/score", files).json()["results"]
    back = requests.post(f"{server.url}/api/csv", json={"results": rows}, timeout=30)
    assert back.status_code == 200 and back.text == text
    assert back.headers["content-disposition"] == 'attachment; filename="tanet_scores.csv"'
    refused = requests.post(f"{server.url}/api/csv", json={"results": [{"image": "a", "score": "high"}]}, timeout=30)
    assert refused.status_code == 422 and "row 1: score must be a finite number" in refused.json()["detail"]
    unknown = requests.post(f"{server.url}/api/csv", json=[{"image": "a", "path": "/etc"}], timeout=30)
    assert unknown.status_code == 422 and "not result columns: path" in unknown.json()["detail"]


def test_the_page_loads_only_its_own_files(ava):
    server, _, _ = ava
    page = requests.get(server.url + "/", timeout=10)
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for name in ("index.html", "app.js", "style.css"):
        text = (REPO / "webapp" / "static" / name).read_text(encoding="utf-8")
        assert "http://" not in text and "https://" not in text and "//cdn" not in text, name
        if name != "index.html":
            assert requests.get(f"{server.url}/static/{name}", timeout=10).status_code == 200
    assert requests.get(f"{server.url}/docs", timeout=10).status_code == 404  # FastAPI's docs load from a CDN


# --------------------------------------------------------------------------- uploads in bounded memory

def _request(chunks, content_type: str) -> Request:
    it = iter(chunks)

    async def receive():
        chunk = next(it, None)
        return {"type": "http.request", "body": chunk or b"", "more_body": chunk is not None}

    scope = {"type": "http", "method": "POST", "path": "/", "headers": [(b"content-type", content_type.encode())]}
    return Request(scope, receive)


def _multipart(parts, boundary: bytes = b"b0undary", chunk: int = 64 << 10):
    """The body of ``parts`` [(name, size)] streamed in chunks, never whole."""
    for name, size in parts:
        yield (b"--" + boundary + b"\r\nContent-Disposition: form-data; name=\"files\"; filename=\"" + name
               + b"\"\r\nContent-Type: image/jpeg\r\n\r\n")
        block = b"\xab" * chunk
        for start in range(0, size, chunk):
            yield block[: min(chunk, size - start)]
        yield b"\r\n"
    yield b"--" + boundary + b"--\r\n"


def test_a_file_over_the_limit_is_read_in_chunks_and_dropped():
    limit = 1 << 20
    parts = [(b"big.tif", 12 << 20), (b"small.jpg", 1000)]
    tracemalloc.start()
    try:
        uploads = asyncio.run(read_uploads(_request(_multipart(parts), "multipart/form-data; boundary=b0undary"),
                                           field="files", max_files=16, max_file_bytes=limit))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    big, small = uploads
    assert big.data is None and big.size == 12 << 20 and "big.tif is 12.0 MB, over the server's limit of 1.0 MB" \
        in big.error
    assert small.data == b"\xab" * 1000 and small.error is None
    assert peak < 3 * limit, f"{peak} bytes held for a 12 MB upload over a 1 MB limit"


def test_a_body_longer_than_the_limits_allow_is_refused_early():
    parts = [(b"a.jpg", 50 << 20)]
    consumed = []

    def counted():
        for chunk in _multipart(parts):
            consumed.append(len(chunk))
            yield chunk

    with pytest.raises(UploadError, match="longer than") as caught:
        asyncio.run(read_uploads(_request(counted(), "multipart/form-data; boundary=b0undary"),
                                 field="files", max_files=2, max_file_bytes=1 << 20))
    assert caught.value.status == 413 and sum(consumed) < 3 << 20


# --------------------------------------------------------------------------- the command line

def test_serve_refuses_bad_options_missing_weights_and_a_taken_port(ava, capsys, tmp_path):
    assert serve.main([]) == 2
    assert "no TANet weights given" in capsys.readouterr().err
    assert serve.main(["--path_to_model_weight", str(tmp_path / "none.pth"), "--port", "0"]) == 2
    assert "none.pth" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        serve.main(["--max_file_bytes", "lots"])
    assert "expected a size in bytes" in capsys.readouterr().err
    assert serve.byte_size("25M") == serve.byte_size("25MiB") == 25 << 20 and serve.byte_size("1000") == 1000
    taken = serve.bind("127.0.0.1", 0)
    try:
        port = taken.getsockname()[1]
        assert serve.main(["--path_to_model_weight", str(ava[2]), "--port", str(port)]) == 2
    finally:
        taken.close()
    assert f"cannot listen on --host 127.0.0.1 --port {port}" in capsys.readouterr().err
    assert serve.url_of("0.0.0.0", 80) == "http://127.0.0.1:80" and serve.url_of("::1", 8) == "http://[::1]:8"
    defaults = serve.build_parser().parse_args([])
    assert Limits(**{k: getattr(defaults, k) for k in ("max_file_bytes", "max_files", "slots", "queue", "max_pixels",
                                                      "body_timeout")}) == Limits()
    assert defaults.host == "127.0.0.1" and defaults.theme_fusion == "isolated"


@pytest.mark.slow
def test_serve_cli_prints_its_url_scores_and_stops_on_ctrl_c(ava, photos):
    _, _, ckpt = ava
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "serve.py", "--path_to_model_weight", str(ckpt), "--port", "0",
                             "--device", "cpu", "--max_files", "2"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert "scoring page at http://127.0.0.1:" in line, line + proc.stderr.read()
        url = line.split(" at ", 1)[1].split(";", 1)[0]
        info = requests.get(f"{url}/api/info", timeout=30).json()
        assert info["limits"]["max_files"] == 2 and info["variant"] == "ava"
        rows = post_files(f"{url}/api/score", [(photos[0].name, photos[0].read_bytes())]).json()["results"]
        assert rows[0]["error"] == "" and 1.0 <= rows[0]["score"] <= 10.0
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# --------------------------------------------------------------------------- the page in a browser

def chromium_driver(profile: Path):
    """Selenium's Chrome driver on Debian's chromium, headless and offline; skips without them."""
    webdriver = pytest.importorskip("selenium.webdriver",
                                    reason="selenium is not installed: pip install -r requirements-deploy.txt")
    if not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()):
        pytest.skip("Chromium is not installed: apt-get install -y chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--no-first-run", "--disable-sync", "--window-size=1280,1000",
                f"--user-data-dir={profile}"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=str(CHROMEDRIVER)))


@pytest.mark.slow
def test_the_page_in_headless_chromium_ranks_photos_and_shows_an_error(ava, photos, bad_files, tmp_path):
    driver = chromium_driver(tmp_path / "profile")  # skips without selenium or Chromium
    try:
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait

        server, scorer, _ = ava
        broken = tmp_path / "broken.jpg"
        broken.write_bytes(bad_files["cut.jpg"])
        chosen = photos[:2]
        want = sorted(((r.score, p.name) for r, p in zip(scorer.score_detailed([str(p) for p in chosen]), chosen)),
                      reverse=True)
        driver.get(server.url + "/")
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: "Variant ava" in d.find_element(By.ID, "model").text)
        driver.find_element(By.ID, "picker").send_keys("\n".join(str(p) for p in [*chosen, broken]))
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results .card:not(.pending)")) == 2
                   and len(d.find_elements(By.CSS_SELECTOR, "#errors li")) == 1)
        cards = driver.find_elements(By.CSS_SELECTOR, "#results .card")
        shown = [(float(c.find_element(By.CLASS_NAME, "score").text), c.find_element(By.CLASS_NAME, "name").text)
                 for c in cards]
        assert [name for _, name in shown] == [name for _, name in want]
        assert [s for s, _ in shown] == [round(s, 2) for s, _ in want]
        assert all(len(c.find_elements(By.CSS_SELECTOR, ".dist .bar")) == 10 for c in cards)
        error = driver.find_element(By.CSS_SELECTOR, "#errors li").text
        assert error.startswith("broken.jpg: image file broken.jpg could not be decoded"), error
        assert "Scored 2 of 3 photos" in driver.find_element(By.ID, "status").text
        cards[0].find_element(By.CSS_SELECTOR, "button.attention").click()
        wait.until(lambda d: d.execute_script("const i = document.getElementById('attention-img');"
                                              "return i.complete && i.naturalWidth") == 1200)
        problems = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert not problems, problems
    finally:
        driver.quit()


# --------------------------------------------------------------------------- the benchmark tool

@pytest.mark.slow
def test_benchmark_serve_reports_images_per_second(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("tanet_benchmark_serve", REPO / "tools" / "benchmark_serve.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    with Image.open(io.BytesIO(bench.photo_jpeg(0))) as img:
        assert img.format == "JPEG" and img.size == (1024, 683)
    out = tmp_path / "bench.json"
    assert bench.main(["--images", "3", "--per_request", "2", "--json", str(out),
                       "--serve_args", "--device cpu --threads 1"]) == 0
    report = json.loads(out.read_text())
    assert report["images"] == 3 and report["server"]["limits"]["max_files"] == 2
    assert report["images_per_s"] == pytest.approx(3 / report["seconds"]) and report["seconds"] > 0
    assert "cores" in report["machine"]


# --------------------------------------------------------------------------- an ONNX export

@pytest.mark.slow
def test_serve_scores_with_an_onnx_export(tmp_path, photos):
    """serve.py takes every checkpoint predict.py takes, an .onnx export too; it has no attention figure."""
    for module in ("onnx", "onnxruntime", "onnxscript"):
        pytest.importorskip(module, reason=f"the ONNX export needs {module} (pip install -r requirements-deploy.txt)")
    from scoring.onnx_export import export_onnx

    ckpt = _checkpoint(tmp_path, "ava")
    exported = tmp_path / "ava.onnx"
    export_onnx(ckpt, exported)
    scorer = Scorer(exported, device="cpu")
    server = Server(create_app(scorer, LIMITS))
    try:
        info = requests.get(f"{server.url}/api/info", timeout=10).json()
        assert info["checkpoint"] == "ava.onnx" and info["variant"] == "ava" and info["attention"] is False
        rows = post_files(f"{server.url}/api/score", [(p.name, p.read_bytes()) for p in photos]).json()["results"]
        want = Scorer(ckpt, device="cpu", amp="none").score_detailed([str(p) for p in photos])
        assert all(r["error"] == "" and abs(r["score"] - w.score) < 1e-4 for r, w in zip(rows, want)), rows
        figure = post_files(f"{server.url}/api/attention", [(photos[0].name, photos[0].read_bytes())], field="file")
        assert figure.status_code == 501 and "needs a PyTorch checkpoint" in figure.json()["detail"]
        assert_up(server)
    finally:
        server.stop()


def test_the_app_leaves_the_model_alone_and_threads_never_switch_its_mode(ava, photos, monkeypatch):
    """The cause of the .onnx crash: create_app set the model's mode itself (an OnnxModel has no eval)
    because Scorer switched a shared model's mode on every forward pass. A Scorer owns its checkpoint's
    model in scoring mode, and leaves a model already so untouched."""
    _, _, ckpt = ava
    scorer = Scorer(ckpt, device="cpu", fast=False)
    assert not scorer.model.training
    switched: list[bool] = []
    monkeypatch.setattr(scorer.model, "train", lambda mode=True: switched.append(mode))
    server = Server(create_app(scorer, LIMITS))
    try:
        rows = post_files(f"{server.url}/api/score", [(photos[0].name, photos[0].read_bytes())]).json()["results"]
    finally:
        server.stop()
    assert rows[0]["error"] == "" and switched == []


# --------------------------------------------------------------------------- slow uploads

def _port(server: Server) -> int:
    return int(server.url.rsplit(":", 1)[1])


def _start_slow_upload(port: int, path: str = "/api/score") -> socket.socket:
    """A client that sends its headers and 50 bytes of a 10 kB body, then nothing unless told."""
    kind = "multipart/form-data; boundary=xyz" if path == "/api/score" else "application/json"
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: {kind}\r\n"
                 f"Content-Length: 10000\r\n\r\n".encode() + b"--xyz\r\nContent-Disposition: form-data; name=\"f"[:50])
    return sock


def _answer_of(sock: socket.socket) -> bytes | None:
    """The bytes the server sent back so far (None: nothing yet)."""
    ready, _, _ = select.select([sock], [], [], 0)
    if not ready:
        return None
    data = b""
    sock.settimeout(5)
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except OSError:  # reset after its answer
        pass
    return data


def test_slow_uploads_hold_no_place_and_get_408_at_their_deadline(ava, photos):
    """Four clients trickle their photos a byte at a time (as many as the one slot and three queue
    places) and one its CSV rows: a whole photo sent meanwhile is scored, and each trickle is answered
    408 at its deadline."""
    _, scorer, _ = ava
    server = Server(create_app(scorer, replace(LIMITS, body_timeout=1.5)))
    slow: list[socket.socket] = []
    try:
        began = time.monotonic()
        slow = [_start_slow_upload(_port(server), path) for path in ["/api/score"] * 4 + ["/api/csv"]]
        time.sleep(0.3)
        health = requests.get(f"{server.url}/api/health", timeout=10).json()
        assert health["admitted"] == 0 and health["receiving"] == 5, health
        whole = post_files(f"{server.url}/api/score", [(photos[0].name, photos[0].read_bytes())])
        assert whole.status_code == 200 and whole.json()["results"][0]["error"] == "", whole.text
        answers: dict[int, bytes] = {}
        for _ in range(80):  # a byte every 0.1 s from each, for at most 8 s
            for i, sock in enumerate(slow):
                if i in answers:
                    continue
                answer = _answer_of(sock)
                if answer is not None:
                    answers[i] = answer
                    continue
                with contextlib.suppress(OSError):
                    sock.sendall(b"x")
            if len(answers) == len(slow):
                break
            time.sleep(0.1)
        took = time.monotonic() - began
    finally:
        for sock in slow:
            sock.close()
        server.stop()
    assert len(answers) == 5, f"{5 - len(answers)} trickling upload(s) still unanswered after {took:.1f} s"
    assert took < 6, took
    for answer in answers.values():
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408"), answer[:200]
        assert "did not arrive in time" in json.loads(body)["detail"]


# --------------------------------------------------------------------------- large images

def _gradient_png(width: int, height: int, mode: str = "RGB") -> bytes:
    """A smooth PNG of ``width`` x ``height`` pixels (small as a file, large decoded)."""
    g = Image.linear_gradient("L").resize((width, height))
    img = Image.merge("RGB", (g, g.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
                              g.transpose(Image.Transpose.FLIP_TOP_BOTTOM)))
    out = io.BytesIO()
    img.convert(mode).save(out, "PNG", compress_level=1)
    return out.getvalue()


def test_a_large_image_is_decoded_reduced_and_a_normal_one_exactly(ava, photos, monkeypatch):
    """Above the threshold a JPEG is decoded at a reduced scale and other formats are reduced before
    any conversion (the tensor close to the full decoding's); below it, the decoding is predict.py's."""
    from imagedata.images import PixelBudget, decode_image, load_image
    from webapp import work
    from webapp.uploads import Upload

    _, scorer, _ = ava
    monkeypatch.setattr(work, "REDUCE_ABOVE_PIXELS", 3_000_000)
    big_png = _gradient_png(4096, 3072, "RGBA")
    jpeg = io.BytesIO()
    Image.open(io.BytesIO(_gradient_png(4096, 3072))).save(jpeg, "JPEG", quality=95)
    for name, data in (("big.png", big_png), ("big.jpg", jpeg.getvalue())):
        budget = PixelBudget(10**9)
        reduced = work.prepare(scorer, Upload(name, data), budget)
        assert budget.limit - budget.left == (4096 * 3072 if name.endswith(".png") else 2048 * 1536), name
        assert decode_image(data, name, reduce_above=work.REDUCE_ABOVE_PIXELS).size == (2048, 1536)
        full = scorer.transform(decode_image(data, name))
        assert (reduced - full).abs().max() < 0.05, name  # normalised units: a few levels of 255 at most
        assert abs(scorer.score(reduced) - scorer.score(full)) < 1e-3
    for path in photos:  # normal photos: bit for bit what predict.py computes
        assert torch.equal(work.prepare(scorer, Upload(path.name, path.read_bytes())),
                           scorer.transform(load_image(path)))


def test_the_pixels_of_one_request_are_bounded(ava, photos):
    _, scorer, _ = ava
    server = Server(create_app(scorer, replace(LIMITS, max_pixels=30_000)))  # a 160x120 photo is 19,200
    try:
        rows = post_files(f"{server.url}/api/score", [(p.name, p.read_bytes()) for p in photos[:2]]).json()["results"]
    finally:
        server.stop()
    assert rows[0]["error"] == "" and rows[1]["score"] is None
    assert rows[1]["error"] == (f"image file {photos[1].name} has 19,200 pixels to decode, more than the 10,800 left "
                                f"of the limit of 30,000 for the images sent together; send it alone or with fewer "
                                f"images"), rows[1]


MEMORY_SCRIPT = r"""
import sys
import torch
from helpers.runtime import tune_cpu_allocator
from scoring import Scorer
from webapp.uploads import Upload
from webapp.work import score_uploads

def rss_mb():
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["VmRSS"].split()[0]) // 1024, int(fields["VmHWM"].split()[0]) // 1024

torch.set_num_threads(1)
scorer = Scorer(sys.argv[1], device="cpu")
tune_cpu_allocator()  # serve.py's default: freed memory is kept for the next batch
small, big = open(sys.argv[2], "rb").read(), open(sys.argv[3], "rb").read()
for _ in range(2):
    score_uploads(scorer, [Upload("small.jpg", small)] * 4)
before, _ = rss_mb()
result = score_uploads(scorer, [Upload("big.png", big)])[0]
after, peak = rss_mb()
print(result.error or "scored", before, after, peak)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status; malloc_trim is glibc's")
def test_a_large_png_costs_its_decoding_only_and_its_memory_is_given_back(ava, photos, tmp_path):
    """A 6000x6000 PNG (under the reduction threshold: decoded whole, 144 MB as Pillow holds RGB) raises
    the peak by about its own size, no copy of it, and the resident memory falls back afterwards."""
    _, _, ckpt = ava
    big = tmp_path / "big.png"
    big.write_bytes(_gradient_png(6000, 6000))
    out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(ckpt), str(photos[0]), str(big)], cwd=REPO,
                         capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    status, before, after, peak = out.stdout.split()[-4:]
    before, after, peak = int(before), int(after), int(peak)
    assert status == "scored"
    assert peak - before < 144 * 1.6, f"peak {peak} MB from {before} MB: more than one decoded copy"
    assert after - before < 40, f"{after - before} MB kept after the request (from {before} MB)"


# --------------------------------------------------------------------------- CSV, JSON, Host, options

def test_csv_cells_a_spreadsheet_would_run_are_neutralised(ava, photos):
    """Names and errors starting with = + - @ tab or CR come back as text (a leading '), numbers unchanged."""
    server, _, _ = ava
    names = ["+cmd|calc.jpg", "=1+2.jpg", "-x.jpg", "@SUM(A1).jpg", "'quoted.jpg"]
    files = [(n, photos[0].read_bytes()) for n in names[:4]]
    text = post_files(f"{server.url}/api/score?format=csv", files).text
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [r["image"] for r in rows] == ["'" + n for n in names[:4]]
    assert all(float(r["score"]) > 0 and float(r["p1"]) > 0 for r in rows)
    sent = [{"image": n, "score": 5.0, "std": 1.0, **{f"p{k}": 0.1 for k in range(1, 11)}, "error": ""} for n in names]
    sent.append({"image": "a.jpg", "score": None, "error": "=HYPERLINK(\"http://x\")"})
    sent.append({"image": "b.jpg", "score": None, "error": "\tcmd"})
    back = requests.post(f"{server.url}/api/csv", json={"results": sent}, timeout=30)
    rows = list(csv.DictReader(io.StringIO(back.text)))
    assert [r["image"] for r in rows] == ["'" + n for n in names] + ["a.jpg", "b.jpg"]
    assert [r["error"] for r in rows[-2:]] == ["'=HYPERLINK(\"http://x\")", "'\tcmd"]
    assert rows[0]["score"] == "5.0" and rows[0]["std"] == "1.0"


def test_deeply_nested_json_gets_a_4xx_detail_and_no_traceback(ava):
    server, _, _ = ava
    records: list[logging.LogRecord] = []
    handler = logging.Handler(level=logging.ERROR)
    handler.emit = records.append
    logger = logging.getLogger("uvicorn.error")
    logger.addHandler(handler)
    try:
        for body in ("[" * 100_000, '{"results": ' + "[" * 100_000 + "]" * 100_000 + "}"):
            answer = requests.post(f"{server.url}/api/csv", data=body, timeout=30,
                                   headers={"Content-Type": "application/json"})
            assert answer.status_code == 400 and "nested too deeply" in answer.json()["detail"], answer.text[:300]
    finally:
        logger.removeHandler(handler)
    assert not records, [r.getMessage() for r in records]
    assert_up(server)


@pytest.mark.parametrize("host, status", [
    ("evil.example", 400), ("evil.example:8000", 400), ("127.0.0.1.evil.example", 400), ("", 400),
    ("localhost:1", 200), ("::1", 400), ("127.0.0.1:99999", 400),
    ("127.0.0.1", 200), ("LOCALHOST", 200), ("[::1]:8000", 200), ("localhost:8000", 200),
])
def test_only_requests_for_this_servers_names_are_answered(ava, host, status):
    """A page elsewhere reaching the server by DNS rebinding sends its own name as Host: 400."""
    server, _, _ = ava
    answer = requests.get(f"{server.url}/api/info", headers={"Host": host}, timeout=10)
    assert answer.status_code == status, (host, answer.text)
    if status == 400:
        assert "is not a name this server answers to" in answer.json()["detail"]
        assert "default-src 'self'" in answer.headers["content-security-policy"]


def test_the_host_names_of_a_server_started_for_another_address():
    assert serve.served_hosts("127.0.0.1") == (("127.0.0.1",), False)
    assert serve.served_hosts("mybox.lan") == (("mybox.lan",), False)
    names, any_address = serve.served_hosts("0.0.0.0")
    assert any_address and socket.gethostname() in names


@pytest.mark.parametrize("hosts, any_address, host, status", [
    (("mybox.lan",), False, "mybox.lan:8000", 200),
    (("mybox.lan",), False, "192.168.1.20:8000", 400),
    (("mybox",), True, "192.168.1.20:8000", 200),
    (("mybox",), True, "[fe80::1]:8000", 200),
    (("mybox",), True, "evil.example", 400),
])
def test_a_server_for_other_addresses_answers_them_only(ava, hosts, any_address, host, status):
    _, scorer, _ = ava
    server = Server(create_app(scorer, LIMITS, hosts=hosts, any_address=any_address))
    try:
        assert requests.get(f"{server.url}/api/info", headers={"Host": host}, timeout=10).status_code == status
        assert requests.get(f"{server.url}/api/info", timeout=10).status_code == 200  # 127.0.0.1 always
    finally:
        server.stop()


def test_a_port_outside_0_to_65535_is_refused_in_one_line(capsys):
    for port in ("99999", "-1", "65536", "http"):
        with pytest.raises(SystemExit) as caught:
            serve.main(["--port", port])
        assert caught.value.code == 2
        errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
        assert errors == [f"serve.py: error: argument --port: must be a port number 0..65535, got "
                          f"{port if port.lstrip('-').isdigit() else repr(port)}"], errors
    assert serve.port_number("0") == 0 and serve.port_number("65535") == 65535


def test_a_request_for_one_file_says_so_in_good_grammar(ava):
    server, _, _ = ava
    two = post_files(f"{server.url}/api/attention", [("a.jpg", b"1"), ("b.jpg", b"2")], field="file")
    assert two.status_code == 413 and "too many files: at most 1 per request;" in two.json()["detail"]
    long = post_files(f"{server.url}/api/attention", [("a.jpg", b"x" * 300_000)], field="file")
    assert long.status_code == 413, long.text
    limit = human_bytes(body_limit(1, LIMITS.max_file_bytes))
    assert long.json()["detail"] == (f"the request is longer than {limit}, the most that 1 file of at most "
                                     f"195.3 KB each can take"), long.json()
