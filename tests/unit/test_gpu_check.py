"""benchmarks/gpu_check.py as far as a CPU machine takes it: arguments, wheel discovery, the device check."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from tests.helpers import REPO

spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)


@pytest.fixture
def wheels(tmp_path):
    for name in ("deepspeed-0.19.8-py3-none-any.whl", "webdataset-1.0.2-py3-none-any.whl", "ninja-1.13.0-py3-none-manylinux.whl"):
        (tmp_path / name).write_bytes(b"")
    return tmp_path


def test_wheels_are_found_by_project_name(wheels):
    assert sorted(gpu_check.find_wheels(wheels)) == ["deepspeed", "ninja", "webdataset"]
    assert gpu_check.find_wheels(None) == {}


def test_no_gpu_is_a_clear_error(wheels, capsys):
    assert gpu_check.main(["--dry-run", "--wheels", str(wheels)]) == 2
    assert "no CUDA device here; this check needs one GPU" in capsys.readouterr().err


def test_a_missing_module_without_its_wheel_names_the_fix(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gpu_check, "missing_modules", lambda: ["deepspeed", "webdataset"])
    (tmp_path / "webdataset-1.0.2-py3-none-any.whl").write_bytes(b"")
    assert gpu_check.main(["--dry-run", "--cpu", "--wheels", str(tmp_path)]) == 2
    assert "deepspeed not importable and no wheel for it" in capsys.readouterr().err


def test_dry_run_says_what_it_would_install(wheels, monkeypatch, capsys):
    monkeypatch.setattr(gpu_check, "missing_modules", lambda: ["deepspeed", "webdataset"])
    assert gpu_check.main(["--dry-run", "--cpu", "--wheels", str(wheels)]) == 0
    out = capsys.readouterr().out
    assert "would install deepspeed, webdataset" in out and "ppo" in out


def test_bad_arguments(wheels):
    with pytest.raises(SystemExit) as exc:
        gpu_check.main(["--steps", "1"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        gpu_check.main(["--dry-run", "--wheels", str(wheels / "nope")])
    assert exc.value.code == 2
