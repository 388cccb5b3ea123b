"""helpers.download.download against real local servers on 127.0.0.1 (success and every failure mode)."""

import hashlib
import http.server
import os
import socket
import time

import pytest
from helpers import download
from http_helpers import serve

PAYLOAD = os.urandom(200_000)
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()


class Handler(http.server.BaseHTTPRequestHandler):
    timeout = 5  # bound every connection of the test server

    def do_GET(self):  # noqa: N802 - http.server API
        if self.path == "/file.bin":
            self.send_response(200)
            self.send_header("Content-Length", str(len(PAYLOAD)))
            self.end_headers()
            self.wfile.write(PAYLOAD)
        elif self.path == "/nolength.bin":  # no Content-Length: body ends when the connection closes
            self.send_response(200)
            self.end_headers()
            self.wfile.write(PAYLOAD)
        elif self.path == "/cut.bin":  # promises all of it, sends half, closes (HTTP/1.0)
            self.send_response(200)
            self.send_header("Content-Length", str(len(PAYLOAD)))
            self.end_headers()
            self.wfile.write(PAYLOAD[: len(PAYLOAD) // 2])
            self.wfile.flush()
        else:
            self.send_error(404, "Not Found")

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    with serve(Handler) as url:
        yield url


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


def assert_clean_failure(folder, dest):
    assert not dest.exists()
    assert list(folder.iterdir()) == []


def test_success_with_checksum_creates_parent_and_prints_sha(server, tmp_path, capsys):
    dest = tmp_path / "weights" / "model.pth"
    got = download.download(f"{server}/file.bin", dest, sha256=PAYLOAD_SHA.upper(), progress=False,
                        chunk_size=4096)
    assert got == dest and dest.read_bytes() == PAYLOAD
    assert os.listdir(dest.parent) == ["model.pth"]
    err = capsys.readouterr().err
    assert PAYLOAD_SHA in err and "%" not in err  # no progress bar when progress=False


def test_success_without_checksum_shows_progress_bar(server, tmp_path, capsys):
    dest = tmp_path / "model.pth"
    download.download(f"{server}/file.bin", dest, progress=True)
    assert dest.read_bytes() == PAYLOAD
    err = capsys.readouterr().err
    assert "100%" in err and PAYLOAD_SHA in err


def test_success_without_content_length(server, tmp_path):
    dest = tmp_path / "model.pth"
    download.download(f"{server}/nolength.bin", dest, sha256=PAYLOAD_SHA, progress=False)
    assert dest.read_bytes() == PAYLOAD


def test_replaces_an_existing_file_only_on_success(server, tmp_path):
    dest = tmp_path / "model.pth"
    dest.write_bytes(b"old")
    with pytest.raises(download.DownloadError):
        download.download(f"{server}/file.bin", dest, sha256="0" * 64, progress=False)
    assert dest.read_bytes() == b"old"
    download.download(f"{server}/file.bin", dest, progress=False)
    assert dest.read_bytes() == PAYLOAD
    assert os.listdir(tmp_path) == ["model.pth"]


def test_checksum_mismatch(server, tmp_path):
    dest = tmp_path / "model.pth"
    url = f"{server}/file.bin"
    with pytest.raises(download.DownloadError, match="checksum") as info:
        download.download(url, dest, sha256="ab" * 32, progress=False)
    assert url in str(info.value) and PAYLOAD_SHA in str(info.value)
    assert_clean_failure(tmp_path, dest)


def test_transfer_cut_off(server, tmp_path):
    dest = tmp_path / "model.pth"
    url = f"{server}/cut.bin"
    with pytest.raises(download.DownloadError, match="cut off") as info:
        download.download(url, dest, progress=False)
    assert url in str(info.value)
    assert_clean_failure(tmp_path, dest)


def test_http_404(server, tmp_path):
    dest = tmp_path / "model.pth"
    url = f"{server}/missing.bin"
    with pytest.raises(download.DownloadError, match="HTTP 404") as info:
        download.download(url, dest, progress=False)
    assert url in str(info.value)
    assert_clean_failure(tmp_path, dest)


def test_server_that_never_answers_times_out(tmp_path):
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)  # the kernel accepts the connection; nobody ever reads or answers
    dest = tmp_path / "model.pth"
    url = f"http://127.0.0.1:{silent.getsockname()[1]}/file.bin"
    try:
        start = time.monotonic()
        with pytest.raises(download.DownloadError, match="timed out") as info:
            download.download(url, dest, timeout=0.5, progress=False)
        assert time.monotonic() - start < 5
    finally:
        silent.close()
    assert url in str(info.value)
    assert_clean_failure(tmp_path, dest)


def test_connection_refused(tmp_path):
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound but not listening: connections are refused
    dest = tmp_path / "model.pth"
    url = f"http://127.0.0.1:{closed.getsockname()[1]}/file.bin"
    try:
        with pytest.raises(download.DownloadError, match="could not connect") as info:
            download.download(url, dest, timeout=2, progress=False)
    finally:
        closed.close()
    assert url in str(info.value)
    assert_clean_failure(tmp_path, dest)


def test_bad_url_and_bad_checksum_argument(tmp_path):
    dest = tmp_path / "model.pth"
    with pytest.raises(download.DownloadError, match="ftp://example.invalid/x"):
        download.download("ftp://example.invalid/x", dest, progress=False)
    with pytest.raises(ValueError, match="64 hex digits"):
        download.download("http://127.0.0.1:9/x", dest, sha256="abc", progress=False)
    assert_clean_failure(tmp_path, dest)


def test_never_disables_tls_verification():
    import inspect

    source = inspect.getsource(download.download)
    assert "verify" not in source
