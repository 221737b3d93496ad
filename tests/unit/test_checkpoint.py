"""CheckpointManager's history on one process: staged saves, commit order, rollback, resume=never.

A stand-in engine writes one JSON file per save, so each test knows exactly what a tag holds. A
``raise@<point>`` fault leaves the directory as a kill at that point would.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vlmscale.config import ConfigError, SFTConfig, load_config
from vlmscale.distributed.group import DistInfo
from vlmscale.train import faults
from vlmscale.train.checkpoint import CheckpointManager, tag_for

ONE = DistInfo(0, 1, 0)


class FakeEngine:
    """What CheckpointManager.save needs of a DeepSpeed engine."""

    def __init__(self, branch: str):
        self.branch = branch

    def save_checkpoint(self, save_dir, *, tag, client_state, save_latest):
        d = Path(save_dir) / tag
        d.mkdir(parents=True, exist_ok=True)
        (d / "state.json").write_text(json.dumps({**client_state, "branch": self.branch}))

    def train_batch_size(self) -> int:
        return 16  # SFT defaults: micro 16 x accum 1 x 1 rank

    def bfloat16_enabled(self) -> bool:
        return True

    def fp16_enabled(self) -> bool:
        return False


def _save(manager: CheckpointManager, step: int, branch: str) -> None:
    manager.save(FakeEngine(branch), step=step, client_state={"step": step})


def _branch(manager: CheckpointManager, tag: str) -> str:
    return json.loads((manager.root / tag / "state.json").read_text())["branch"]


def _dirs(manager: CheckpointManager) -> set[str]:
    return {p.name for p in manager.root.iterdir() if p.is_dir()}


def _relaunch(out: Path, keep_last: int) -> CheckpointManager:
    manager = CheckpointManager(out, dist=ONE, keep_last=keep_last)
    manager.clean_partial()
    return manager


def test_a_save_is_staged_then_renamed_into_place(tmp_path):
    manager = CheckpointManager(tmp_path, dist=ONE, keep_last=0)
    _save(manager, 5, "a")
    assert _dirs(manager) == {tag_for(5)}
    assert (manager.root / tag_for(5) / "COMMITTED").is_file()
    assert (manager.root / tag_for(5) / "rng" / "rank-00000.pt").is_file()
    assert manager.meta(tag_for(5))["seq"] == 1


def test_retention_after_a_rollback_keeps_the_newest_commits(tmp_path):
    manager = CheckpointManager(tmp_path, dist=ONE, keep_last=2)
    for step in (5, 10, 15):
        _save(manager, step, "first")
    # resume=<step-10>: the run goes on from step 10 and saves 12, then 14
    for step in (12, 14):
        _save(manager, step, "rollback")
    assert _dirs(manager) == {tag_for(12), tag_for(14)}  # not step-15, the abandoned branch's highest name
    (manager.root / "latest").unlink()
    assert manager.newest() == tag_for(14)


def test_resaving_a_tag_after_a_rollback_killed_before_the_commit_keeps_the_old_one_whole(tmp_path, monkeypatch):
    manager = CheckpointManager(tmp_path, dist=ONE, keep_last=0)
    for step in (5, 10):
        _save(manager, step, "first")
    old = (manager.root / tag_for(10) / "COMMITTED").read_text()
    monkeypatch.setenv(faults.ENV, "raise@save=10")  # shards of the re-save written, nothing committed
    with pytest.raises(faults.InjectedFault):
        _save(manager, 10, "rollback")
    monkeypatch.delenv(faults.ENV)
    manager = _relaunch(tmp_path, keep_last=0)
    assert _dirs(manager) == {tag_for(5), tag_for(10)}
    assert (manager.root / tag_for(10) / "COMMITTED").read_text() == old
    assert _branch(manager, tag_for(10)) == "first"  # no new shard under the old COMMITTED
    assert manager.newest() == tag_for(10)


def test_resaving_a_tag_after_a_rollback_killed_mid_rename_completes_the_new_one(tmp_path, monkeypatch):
    manager = CheckpointManager(tmp_path, dist=ONE, keep_last=0)
    for step in (5, 10):
        _save(manager, step, "first")
    monkeypatch.setenv(faults.ENV, "raise@replace=10")  # committed, old one moved aside, not yet renamed
    with pytest.raises(faults.InjectedFault):
        _save(manager, 10, "rollback")
    monkeypatch.delenv(faults.ENV)
    assert tag_for(10) not in _dirs(manager)
    manager = _relaunch(tmp_path, keep_last=0)
    assert _dirs(manager) == {tag_for(5), tag_for(10)}
    assert _branch(manager, tag_for(10)) == "rollback"
    assert manager.meta(tag_for(10))["seq"] == 3
    assert manager.newest() == tag_for(10)


def _cfg(out: Path, *extra: str):
    return load_config(SFTConfig, overrides=[f"output_dir={out}", *extra])


def test_resume_never_over_an_old_history_is_refused_unless_overwrite_moves_it_aside(tmp_path, demo_dir):
    from vlmscale.train.launch import check_paths
    from vlmscale.train.setup import open_checkpoints

    demo = f"data.demo_dir={demo_dir}"  # the session's demo data (the default data/demo would be generated)
    _save(CheckpointManager(tmp_path, dist=ONE, keep_last=2), 5, "old run")
    with pytest.raises(ConfigError, match=r"resume=never .*new output_dir.*checkpoint\.overwrite=true"):
        check_paths(_cfg(tmp_path, "resume=never", demo))
    check_paths(_cfg(tmp_path, "resume=auto", demo))  # continuing it is fine
    cfg = _cfg(tmp_path, "resume=never", "checkpoint.overwrite=true", demo)
    check_paths(cfg)
    manager = open_checkpoints(cfg, ONE)
    assert manager.newest() is None
    (aside,) = tmp_path.glob("checkpoints.old-*")
    assert (aside / tag_for(5) / "COMMITTED").is_file()
    _save(manager, 5, "new run")
    assert _branch(manager, tag_for(5)) == "new run" and _dirs(manager) == {tag_for(5)}


def test_a_large_checkpoint_from_another_world_size_must_be_converted_offline(tmp_path):
    from vlmscale.train.launch import check_universal_size

    manager = CheckpointManager(tmp_path, dist=ONE, keep_last=0)
    _save(manager, 5, "a")  # saved by 1 rank
    check_universal_size(_cfg(tmp_path), manager, tag_for(5), world_size=1)  # same world size: nothing to convert
    check_universal_size(_cfg(tmp_path), manager, tag_for(5), world_size=2)  # small: converted inside the job
    with pytest.raises(ConfigError, match=r"auto_universal_max_gb=0.*vlmscale ckpt convert .* --to universal"):
        check_universal_size(_cfg(tmp_path, "checkpoint.auto_universal_max_gb=0"), manager, tag_for(5), world_size=2)
    (manager.root / tag_for(5) / "universal").mkdir()  # converted offline: the relaunch goes ahead
    check_universal_size(_cfg(tmp_path, "checkpoint.auto_universal_max_gb=0"), manager, tag_for(5), world_size=2)
