"""Atomic writes, safe checkpoint loading and file hashing in safe_io.py."""

import errno
import hashlib
import json
import os
import pathlib
import pickle
import zipfile

import pytest
import torch

from reliability_helpers import MarkerPayload
from helpers import safe_io
def listing(folder: pathlib.Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ---------------------------------------------------------------- atomic_write

def test_atomic_write_binary_and_text(tmp_path):
    with safe_io.atomic_write(tmp_path / "a.bin") as f:
        f.write(b"\x00\x01")
    with safe_io.atomic_write(tmp_path / "b.txt", "w") as f:
        f.write("héllo\n")
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "b.txt").read_text(encoding="utf-8") == "héllo\n"
    assert listing(tmp_path) == ["a.bin", "b.txt"]


def test_atomic_write_failure_leaves_original_untouched_and_no_temp(tmp_path):
    target = tmp_path / "out.json"
    target.write_text("original")
    with pytest.raises(RuntimeError, match="boom"):
        with safe_io.atomic_write(target, "w") as f:
            f.write("partial")
            raise RuntimeError("boom")
    assert target.read_text() == "original"
    assert listing(tmp_path) == ["out.json"]


def test_atomic_write_failure_on_new_path_leaves_nothing(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with safe_io.atomic_write(tmp_path / "new.bin") as f:
            f.write(b"x")
            raise KeyboardInterrupt
    assert listing(tmp_path) == []


def test_atomic_write_replaces_existing_creates_parent_and_keeps_normal_permissions(tmp_path):
    target = tmp_path / "sub" / "dir" / "f.txt"
    with safe_io.atomic_write(target, "w") as f:
        f.write("one")
    with safe_io.atomic_write(target, "w") as f:
        f.write("two")
    assert target.read_text() == "two"
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    assert (target.stat().st_mode & 0o777) == (plain.stat().st_mode & 0o777)
    assert listing(target.parent) == ["f.txt"]


def test_atomic_write_rejects_other_modes(tmp_path):
    with pytest.raises(ValueError, match="mode"):
        with safe_io.atomic_write(tmp_path / "x", "a"):
            pass


def test_atomic_save_json_indent_and_nan_as_null(tmp_path):
    target = tmp_path / "m.json"
    safe_io.atomic_save_json({"srcc": float("nan"), "n": 3}, target)
    text = target.read_text()
    assert '\n  "srcc": null' in text
    assert json.loads(text) == {"srcc": None, "n": 3}


def test_atomic_save_json_unserialisable_keeps_original(tmp_path):
    target = tmp_path / "m.json"
    safe_io.atomic_save_json({"a": 1}, target)
    with pytest.raises(TypeError):
        safe_io.atomic_save_json({"a": object()}, target)
    assert json.loads(target.read_text()) == {"a": 1}
    assert listing(tmp_path) == ["m.json"]


def test_atomic_torch_save_round_trip(tmp_path):
    target = tmp_path / "ck.pth"
    safe_io.atomic_torch_save({"w": torch.arange(4.0), "epoch": 3}, target)
    loaded = safe_io.safe_torch_load(target)
    assert loaded["epoch"] == 3 and torch.equal(loaded["w"], torch.arange(4.0))
    assert listing(tmp_path) == ["ck.pth"]


# ---------------------------------------------------------------- safe_torch_load

def test_code_running_checkpoint_is_refused_and_does_not_run(tmp_path):
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "evil.pth"
    torch.save({"state_dict": {"w": torch.ones(2)}, "payload": MarkerPayload(marker)}, ckpt)
    assert not marker.exists()
    with pytest.raises(safe_io.UnsafeCheckpointError) as info:
        safe_io.safe_torch_load(ckpt)
    message = str(info.value)
    assert str(ckpt) in message and "--allow_unsafe_load" in message and "trusted" in message
    assert "full unpickling" in message and "pathlib" in message and "truncated" not in message
    assert "\n" not in message
    assert isinstance(info.value, safe_io.CheckpointError) and isinstance(info.value, ValueError)
    assert not marker.exists()


@pytest.mark.parametrize("writer", ["torch", "pickle"])
def test_refusal_says_what_a_malicious_pickle_would_run(tmp_path, writer):
    """A plain pickle (protocol 4, which the weights-only unpickler cannot even read) and a PyTorch zip:
    both are named for what they would import, and told apart from a truncated file."""
    marker, ckpt = tmp_path / "pwned", tmp_path / "evil.pth"
    payload = {"model": {"w": torch.ones(2)}, "x": MarkerPayload(marker)}
    if writer == "torch":
        torch.save(payload, ckpt)
    else:
        ckpt.write_bytes(pickle.dumps(payload, protocol=4))
    assert any(name.startswith("pathlib.Path") for name in safe_io.referenced_globals(ckpt))
    with pytest.raises(safe_io.UnsafeCheckpointError, match="needs full unpickling.*--allow_unsafe_load"):
        safe_io.safe_torch_load(ckpt)
    truncated = tmp_path / "cut.pth"
    truncated.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    with pytest.raises(safe_io.CheckpointError, match="truncated or wrong format") as info:
        safe_io.safe_torch_load(truncated)
    assert not isinstance(info.value, safe_io.UnsafeCheckpointError)
    assert not marker.exists()


def test_code_running_checkpoint_loads_with_explicit_opt_in(tmp_path):
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "evil.pth"
    torch.save({"w": torch.ones(2), "payload": MarkerPayload(marker)}, ckpt)
    with pytest.warns(UserWarning, match="arbitrary code"):
        loaded = safe_io.safe_torch_load(ckpt, allow_unsafe=True)
    assert torch.equal(loaded["w"], torch.ones(2))
    assert marker.exists()


def test_safe_checkpoint_with_opt_in_loads_without_warning(tmp_path, recwarn):
    ckpt = tmp_path / "ok.pth"
    torch.save({"w": torch.ones(2)}, ckpt)
    assert torch.equal(safe_io.safe_torch_load(ckpt, allow_unsafe=True)["w"], torch.ones(2))
    assert not [w for w in recwarn if "arbitrary code" in str(w.message)]


def test_legacy_format_plain_state_dict_loads(tmp_path):
    ckpt = tmp_path / "legacy.pth.tar"
    torch.save({"state_dict": {"module.fc.weight": torch.zeros(2, 2)}}, ckpt,
               _use_new_zipfile_serialization=False)
    assert safe_io.safe_torch_load(ckpt)["state_dict"]["module.fc.weight"].shape == (2, 2)


def _real_checkpoint_bytes(tmp_path: pathlib.Path) -> bytes:
    src = tmp_path / "src.pth"
    torch.save({"w": torch.randn(64, 64)}, src)
    data = src.read_bytes()
    src.unlink()
    return data


@pytest.mark.parametrize("kind", ["empty", "truncated", "random", "json", "zip", "legacy_truncated"])
def test_bad_files_raise_checkpoint_error_naming_the_file(tmp_path, kind):
    path = tmp_path / f"{kind}_model.pth"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        data = _real_checkpoint_bytes(tmp_path)
        path.write_bytes(data[: len(data) // 2])
    elif kind == "random":
        path.write_bytes(os.urandom(4096))
    elif kind == "json":
        path.write_text(json.dumps({"state_dict": {"w": [1, 2]}}))
    elif kind == "zip":
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("readme.txt", "not a model")
    else:
        src = tmp_path / "src.pth"
        torch.save({"w": torch.randn(64, 64)}, src, _use_new_zipfile_serialization=False)
        data = src.read_bytes()
        src.unlink()
        path.write_bytes(data[: len(data) // 2])
    with pytest.raises(safe_io.CheckpointError) as info:
        safe_io.safe_torch_load(path)
    assert not isinstance(info.value, safe_io.UnsafeCheckpointError)
    assert path.name in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_and_directory_raise_checkpoint_error(tmp_path):
    with pytest.raises(safe_io.CheckpointError, match="nothere.pth.*not found"):
        safe_io.safe_torch_load(tmp_path / "nothere.pth")
    with pytest.raises(safe_io.CheckpointError, match="not a file"):
        safe_io.safe_torch_load(tmp_path)


def test_numpy_objects_need_opt_in(tmp_path):
    import numpy as np

    ckpt = tmp_path / "np.pth"
    torch.save({"arr": np.arange(3)}, ckpt)
    with pytest.raises(safe_io.UnsafeCheckpointError, match="np.pth"):
        safe_io.safe_torch_load(ckpt)


# ---------------------------------------------------------------- sha256

def test_sha256_file(tmp_path):
    data = os.urandom(3 << 20)  # spans several read blocks
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert safe_io.sha256_file(path) == hashlib.sha256(data).hexdigest()
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert safe_io.sha256_file(empty) == hashlib.sha256(b"").hexdigest()


# ---------------------------------------------------------------- a full disk

def fill_disk_after(monkeypatch, limit: int) -> None:
    """Writes to the temp files of atomic writes raise ENOSPC once ``limit`` bytes are in them."""
    real_fdopen = os.fdopen

    class Full:
        def __init__(self, f):
            self._f, self._n = f, 0

        def write(self, data):
            self._n += len(data)
            if self._n > limit:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self._f.write(data)

        def __getattr__(self, name):
            return getattr(self._f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self._f.__exit__(*exc)

    monkeypatch.setattr(os, "fdopen", lambda fd, *a, **k: Full(real_fdopen(fd, *a, **k)))


@pytest.mark.parametrize("kind", ["checkpoint", "json"])
def test_a_full_disk_names_the_folder_and_the_space_needed_and_keeps_the_old_file(tmp_path, monkeypatch, kind):
    target = tmp_path / ("last.pth" if kind == "checkpoint" else "results.json")
    target.write_bytes(b"old")
    fill_disk_after(monkeypatch, 1000)
    with pytest.raises(safe_io.DiskFullError) as caught:
        if kind == "checkpoint":
            safe_io.atomic_torch_save({"w": torch.zeros(100_000)}, target)
        else:
            safe_io.atomic_save_json({"rows": list(range(10_000))}, target)
    message = str(caught.value)
    assert caught.value.errno == errno.ENOSPC and "\n" not in message
    assert str(tmp_path) in message and f"{target.name} needs " in message and " free" in message
    if kind == "checkpoint":
        assert "needs 0.4 MB" in message  # 100,000 float32 and the zip's few bytes
    assert target.read_bytes() == b"old" and listing(tmp_path) == [target.name]
