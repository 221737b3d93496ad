"""Shared fixtures: one small demo dataset and the tiny preset's assets per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_report_header(config):
    # CI logs name the machine: test times and the precision "auto" picks both depend on it
    from vlmscale.precision import cpu_bf16

    native, why = cpu_bf16()
    return [f"cpu: {why}; {os.cpu_count()} cores"]


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    from vlmscale.data.demo import generate_demo

    out = tmp_path_factory.mktemp("demo") / "demo"
    generate_demo(out, num_train_scenes=120, num_heldout_scenes=12, seed=0)
    return out


@pytest.fixture(scope="session")
def tiny_assets():
    from vlmscale.model.build import preset_assets

    return preset_assets("tiny")


@pytest.fixture(scope="session")
def demo_assets():
    from vlmscale.model.build import preset_assets

    return preset_assets("demo")


@pytest.fixture(scope="session", autouse=True)
def _free_shared_memory():
    yield
    from tests.helpers import remove_shm_buffers

    remove_shm_buffers()
