"""Shared fixtures: a small demo data set generated once per test session."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory):
    """The demo data set (TAD66K layout), generated into a temporary folder."""
    from demo_data import ensure_demo_dataset

    return ensure_demo_dataset(tmp_path_factory.mktemp("demo") / "demo", n_train=48, n_test=16)
