"""Shared fixtures: a small demo data set generated once per test session; the image-check cache of
the session in a temporary folder (also for the scripts the tests start)."""
from __future__ import annotations

import os

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def image_check_cache(tmp_path_factory):
    """Where image_check remembers decoded images: a folder of this test session, not ~/.cache."""
    folder = tmp_path_factory.mktemp("tanet-cache")
    old = os.environ.get("TANET_CACHE_DIR")
    os.environ["TANET_CACHE_DIR"] = str(folder)
    yield folder
    if old is None:
        os.environ.pop("TANET_CACHE_DIR", None)
    else:
        os.environ["TANET_CACHE_DIR"] = old


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory):
    """The demo data set (TAD66K layout), generated into a temporary folder."""
    from imagedata.demo_data import ensure_demo_dataset

    return ensure_demo_dataset(tmp_path_factory.mktemp("demo") / "demo", n_train=48, n_test=16)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread: as fast on 2 idle cores, far faster on busy ones (no spinning threads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def personal_root(tmp_path_factory):
    """A tiny personalized demo data set (FLICKR-AES format): 3 test workers with 14-16 images each."""
    from imagedata.personal_data import ensure_personal_dataset

    return ensure_personal_dataset(tmp_path_factory.mktemp("personal") / "demo", n_generic=12, n_workers=9,
                                   n_test_workers=3, test_worker_images=(14, 16), size=64)


@pytest.fixture(scope="session")
def golden_onnx(tmp_path_factory):
    """{variant: (checkpoint, .onnx)} of golden-weight TANets: one real export per session (slow)."""
    for module in ("onnx", "onnxruntime", "onnxscript"):
        pytest.importorskip(module, reason=f"the ONNX tests need {module} (pip install -r requirements-deploy.txt)")
    from scoring.onnx_export import export_onnx
    from golden import golden_state_dict

    root = tmp_path_factory.mktemp("onnx")
    files = {}
    for variant in ("tad66k", "ava"):
        checkpoint = root / f"{variant}.pth"
        torch.save({"model": golden_state_dict(variant), "variant": variant}, checkpoint)
        export_onnx(checkpoint, root / f"{variant}.onnx")
        files[variant] = (checkpoint, root / f"{variant}.onnx")
    return files
