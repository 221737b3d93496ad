"""Reliability on 2 CPU ranks under ZeRO-3 with the tiny model (docs/reliability.md).

One uninterrupted 20-step run is the reference. A second run of the same config goes through a
chain of failures, each relaunched with ``resume=latest``:

1. SIGKILL rank 1 as step 7 begins                  -> resumes from step 5
2. SIGKILL rank 1 inside the save of step 10         -> .saving-step-10 is torn; resumes from step 5 again
3. SIGKILL rank 0 while retention deletes step 5     -> half-deleted dir is cleaned; resumes from 15
4. SIGKILL rank 1 inside the (synchronous) save of step 20 -> .saving-step-20 is torn; resumes from 15 again
5. runs to step 20

Its losses at every step and the multiset of sample ids it trained on must equal the reference's.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import signal
import time
from pathlib import Path

import psutil
import pytest
import torch

from tests.helpers import launch, losses, metrics

pytestmark = pytest.mark.distributed

STEPS = 20


def _overrides(demo_dir, out, start, *extra):
    return [f"output_dir={out}", f"data.demo_dir={demo_dir}", f"model.init_from={start}", "train.micro_batch_size=4",
            f"train.max_steps={STEPS}", "train.log_every_steps=1", "train.log_sample_ids=true",
            "checkpoint.every_steps=5", "checkpoint.keep_last=2", "checkpoint.export=false", "eval.at_end=false",
            "optim.lr=1e-2", "optim.warmup_steps=1", "policy.projector.lr=1e-2", *extra]


def _sample_ids(out: Path) -> collections.Counter:
    ids: collections.Counter = collections.Counter()
    for f in sorted((out / "samples").glob("rank-*.jsonl")):
        rows = [json.loads(line) for line in f.read_text().splitlines()]
        assert sorted(r["step"] for r in rows) == list(range(1, STEPS + 1)), f"{f}: steps not logged exactly once"
        for r in rows:
            ids.update(r["ids"])
    return ids


def _ckpts(out: Path) -> set[str]:
    return {p.name for p in (out / "checkpoints").iterdir() if p.is_dir()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, demo_dir, start_model):
    out = tmp_path_factory.mktemp("reliability") / "reference"
    launch("sft", *_overrides(demo_dir, out, start_model))
    return out


@pytest.fixture(scope="module")
def crashed(tmp_path_factory, demo_dir, start_model):
    """The failure chain; returns the output dir and each launch's (returncode, stderr, checkpoint dirs after).

    Saves are asynchronous (``checkpoint.async_save``: DeepSpeed's writer process per rank, a save committed
    after the next step) except in the third and fourth launches: so the torn save of the second is rank 1
    SIGKILLed while step 10's writers are still writing, the fourth's is an ordinary save killed after its
    files are written and before the commit, and the chain still ends bitwise equal to the synchronous
    reference."""
    out = tmp_path_factory.mktemp("reliability") / "crashed"
    args = _overrides(demo_dir, out, start_model)
    runs = []
    for fault, resume, saves in [("kill@step=7,rank=1", "auto", "true"), ("kill@save=10,rank=1", "latest", "true"),
                                 ("kill@retain=15,rank=0", "latest", "false"), ("kill@save=20,rank=1", "latest", "false"),
                                 ("", "latest", "true")]:
        t0 = time.time()
        proc = launch("sft", *args, f"resume={resume}", f"checkpoint.async_save={saves}", check=False,
                      env={"VLMSCALE_FAULT": fault})
        runs.append({"code": proc.returncode, "log": proc.stderr, "ckpts": _ckpts(out), "seconds": time.time() - t0})
    return out, runs


def test_kill_one_rank_then_resume_matches_the_uninterrupted_run(reference, crashed):
    out, runs = crashed
    assert runs[0]["code"] != 0
    assert runs[0]["ckpts"] == {"step-00000005"}  # the async save of step 5 was committed after step 6
    assert "checkpoint step-00000005 handed to the writer processes" in runs[0]["log"], runs[0]["log"][-3000:]
    assert "resumed from step-00000005 at step 5" in runs[1]["log"]
    assert runs[-1]["code"] == 0, runs[-1]["log"][-3000:]
    ref, got = losses(reference), losses(out)
    assert sorted(got) == list(range(1, STEPS + 1))
    # same world size, same data, same reduction order: bitwise equal, not merely close
    assert [got[s] for s in range(6, STEPS + 1)] == [ref[s] for s in range(6, STEPS + 1)]
    ref_ids, got_ids = _sample_ids(reference), _sample_ids(out)
    assert got_ids == ref_ids
    assert max(ref_ids.values()) == 1, "the reference itself repeats a sample; the no-repeat check would be vacuous"


def test_torn_save_is_ignored_and_removed(crashed):
    out, runs = crashed
    assert runs[1]["code"] != 0
    assert ".saving-step-00000010" in runs[1]["ckpts"]  # staged, the writers still writing ...
    log = runs[2]["log"]
    assert "removing incomplete checkpoint" in log and "step-00000010" in log  # ... but never committed
    assert "resumed from step-00000005 at step 5" in log


def test_retention_survives_a_kill_mid_delete(crashed):
    out, runs = crashed
    assert runs[2]["code"] != 0
    assert runs[2]["ckpts"] == {"step-00000010", "step-00000015", ".deleting-step-00000005"}
    assert "resumed from step-00000015 at step 15" in runs[3]["log"]
    assert _ckpts(out) == {"step-00000015", "step-00000020"}  # exactly keep_last=2, all complete
    assert (out / "checkpoints" / "latest").read_text() == "step-00000020"
    for tag in _ckpts(out):
        assert (out / "checkpoints" / tag / "COMMITTED").is_file()


def test_torn_ordinary_save_is_ignored_and_removed(crashed):
    out, runs = crashed
    assert runs[3]["code"] != 0
    assert ".saving-step-00000020" in runs[3]["ckpts"] and "step-00000020" not in runs[3]["ckpts"]
    log = runs[4]["log"]
    assert "removing incomplete checkpoint" in log and "step-00000020" in log
    assert "resumed from step-00000015 at step 15" in log


def test_explicit_resume_with_nothing_loadable_fails(tmp_path, demo_dir, start_model):
    out = tmp_path / "empty"
    (out / "checkpoints" / "step-00000005").mkdir(parents=True)  # a torn save only
    proc = launch("sft", *_overrides(demo_dir, out, start_model), "resume=latest", check=False)
    assert proc.returncode == 2
    assert "resume=latest" in proc.stderr and "no complete checkpoint" in proc.stderr
    # refused before any model is built (the ranks agree on filesystem checks in one collective)
    assert "parameters on this rank after build" not in proc.stdout + proc.stderr


# ---------------------------------------------------------------------------------------- NaN / inf


def _fp32_partition(ckpt: Path, rank: int) -> torch.Tensor:
    from vlmscale.train.safe_load import safe_torch_load

    (path,) = ckpt.glob(f"*zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")  # bf16_ prefix when trained in bf16
    state = safe_torch_load(str(path))
    osd = state["optimizer_state_dict"]
    return torch.cat([t.flatten().float() for t in osd["fp32_flat_groups"]])


def test_nonfinite_loss_on_one_rank_skips_the_update_everywhere(tmp_path, demo_dir, start_model):
    out = tmp_path / "nan"
    launch("sft", *_overrides(demo_dir, out, start_model), "train.max_steps=5", "checkpoint.every_steps=1",
           "checkpoint.keep_last=0", env={"VLMSCALE_FAULT": "nan@step=3,rank=1"})
    rows = {r["step"]: r for r in metrics(out) if "loss" in r}
    assert rows[2]["nonfinite_skips"] == 0 and rows[3]["nonfinite_skips"] == 1 and rows[5]["nonfinite_skips"] == 1
    ck = out / "checkpoints"
    for rank in (0, 1):  # each rank's fp32 master partition: unchanged by step 3, changed by step 4
        p2, p3, p4 = (_fp32_partition(ck / f"step-0000000{s}", rank) for s in (2, 3, 4))
        assert torch.equal(p2, p3)
        assert not torch.equal(p3, p4)
    assert all(v == v for s, v in ((s, rows[s]["loss"]) for s in (4, 5)))  # finite again afterwards


def test_consecutive_nonfinite_steps_stop_the_run(tmp_path, demo_dir, start_model):
    out = tmp_path / "nan_stop"
    proc = launch("sft", *_overrides(demo_dir, out, start_model), "train.max_steps=10", "checkpoint.every_steps=2",
                  "train.max_consecutive_nonfinite=3", check=False, env={"VLMSCALE_FAULT": "nan@step>=3,rank=0"})
    assert proc.returncode == 4, proc.stderr[-3000:]
    assert "3 consecutive steps with a non-finite loss" in proc.stderr
    ck = out / "checkpoints"
    latest = (ck / "latest").read_text()
    assert latest == "step-00000004" and (ck / latest / "COMMITTED").is_file()
    for rank in (0, 1):  # the checkpoint after two skipped steps holds the step-2 parameters
        assert torch.equal(_fp32_partition(ck / "step-00000002", rank), _fp32_partition(ck / latest, rank))
    assert not (ck / "step-00000006").exists()


# ---------------------------------------------------------------------------------------- hang watchdog


def _leftovers(marker: str) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(marker in part for part in (p.info["cmdline"] or [])):
                found.append(p)
        except psutil.Error:
            pass
    return found


def test_stopped_rank_makes_the_others_exit_with_stack_dumps(tmp_path, demo_dir, start_model):
    """Rank 1 SIGSTOPped at step 3: rank 0's watchdog dumps its stacks and exits. The launcher then SIGTERMs
    every rank and SIGKILLs, 30 s later, the stopped one (it cannot act on SIGTERM); once rank 0's dump is
    written the test ends the stopped rank itself, which is all those 30 s would do."""
    import subprocess

    from tests.helpers import REPO, deepspeed_cmd, port

    out = tmp_path / "hang"
    t0 = time.time()
    cmd = deepspeed_cmd(2, port(29600, 300), str(REPO / "recipes" / "sft.py"),
                        *_overrides(demo_dir, out, start_model), "train.hang_timeout_s=10")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "VLMSCALE_FAULT": "stop@step=3,rank=1"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    dump_file = out / "hang" / "rank-00000.txt"
    while proc.poll() is None and time.time() - t0 < 240:
        if dump_file.is_file() and "File " in dump_file.read_text():
            time.sleep(1)  # rank 0 exits right after writing
            for p in _leftovers(str(out)):
                with contextlib.suppress(psutil.Error):
                    if p.status() == psutil.STATUS_STOPPED:
                        p.kill()
            break
        time.sleep(0.5)
    proc.communicate(timeout=120)
    elapsed = time.time() - t0
    try:
        assert proc.returncode != 0
        dump = (out / "hang" / "rank-00000.txt").read_text()
        assert "Timeout" in dump and "File " in dump  # faulthandler's all-thread stack dump
        # rank 0 waits in a collective with the stopped rank: the step's all-reduce, or (data.balance, the
        # default of sft) the balanced sampler's all-gather of the next window's sample sizes
        assert "train_step" in dump or "all_reduce" in dump or "window_sizes" in dump
        assert [r["step"] for r in metrics(out) if "loss" in r][-1] == 2
        print(f"watchdog: launch exited after {elapsed:.0f}s (timeout 10s + launcher grace)")
    finally:
        left = _leftovers(str(out))
        for p in left:
            os.kill(p.pid, signal.SIGKILL)
    assert not left, f"processes left behind: {[p.pid for p in left]}"


# ---------------------------------------------------------------------------------------- modality divergence


def _modality(tmp_path, demo_dir, mode, *flags, timeout=240):
    import subprocess

    from tests.helpers import REPO, deepspeed_cmd, port

    out = tmp_path / mode
    cmd = deepspeed_cmd(2, port(29900, 90), "--no_local_rank", str(REPO / "tests" / "distributed" / "modality_script.py"),
                        str(demo_dir), mode, str(out), *flags)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        code, log = proc.returncode, proc.stderr
    except subprocess.TimeoutExpired as exc:
        code, log = None, str(exc)
    finally:
        for p in _leftovers(str(out)):
            os.kill(p.pid, signal.SIGKILL)
    results = [json.loads(Path(f"{out}.rank{r}").read_text()) for r in (0, 1) if Path(f"{out}.rank{r}").exists()]
    return code, log, results, time.time() - t0


@pytest.mark.parametrize("mode", ["mixed", "text"])
def test_ranks_with_and_without_images_do_not_hang(tmp_path, demo_dir, mode):
    code, log, results, _ = _modality(tmp_path, demo_dir, mode)
    assert code == 0, log[-3000:]
    assert len(results) == 2
    # one optimizer step over both ranks: each rank reports the same global loss
    assert results[0]["losses"] == results[1]["losses"]
    assert all(v == v for v in results[0]["losses"])


def test_negative_control_without_the_guard_hangs_or_fails(tmp_path, demo_dir):
    code, log, results, seconds = _modality(tmp_path, demo_dir, "mixed", "--no-guard")
    assert code != 0, "without the dummy tile the mismatched ZeRO-3 collectives should not complete"
    assert len(results) < 2
    # gloo notices the mismatched all-gathers (NCCL would block until its timeout); either way no step completes
    hung = any(p.read_text().startswith("Timeout") for p in (tmp_path / "mixed.dir" / "hang").glob("*.txt"))
    assert hung or "collective mismatch" in log or code is None
    print(f"negative control: exit code {code} after {seconds:.0f}s")


# ---------------------------------------------------------------------------------------- configuration and loading


@pytest.mark.parametrize("override,needle", [
    ("train.global_batch_size=5", "global_batch_size"),  # 4 per rank x 2 ranks = 8
    ("train.max_step=3", "Did you mean"),
    ("data.sources=[{name: x, path: /nonexistent/shards, weight: 1}]", "does not exist"),
    ("policy.projector.trainable=false", "projector"),
])
def test_bad_configuration_fails_before_any_process_group(tmp_path, demo_dir, start_model, override, needle):
    recipe = "align" if override.startswith("policy.projector") else "sft"
    # the config checks are the same code on every rank: one launch goes through the 2-rank launcher (the
    # path check, whose ranks agree in a collective), the others run the recipe as one process
    nproc = 2 if needle in ("does not exist", "global_batch_size") else 0
    proc = launch(recipe, *_overrides(demo_dir, tmp_path / "bad", start_model), override, nproc=nproc, check=False,
                  timeout=120)
    assert proc.returncode == 2
    assert "config error" in proc.stderr and needle in proc.stderr, proc.stderr[-2000:]
    if needle != "does not exist":  # a path can differ between nodes: the ranks agree on those in one collective
        assert "Initializing TorchBackend" not in proc.stdout + proc.stderr
    assert "parameters on this rank after build" not in proc.stdout + proc.stderr
    assert not (tmp_path / "bad").exists()


class _Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_tampered_checkpoint_is_refused(tmp_path, reference, demo_dir, start_model):
    import shutil

    out = tmp_path / "tampered"
    shutil.copytree(reference / "checkpoints", out / "checkpoints")
    victim = out / "checkpoints" / "step-00000020" / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    marker = tmp_path / "PWNED"
    torch.save({"module": _Exploit(marker)}, victim)
    proc = launch("sft", *_overrides(demo_dir, out, start_model), "train.max_steps=25", "resume=latest", check=False)
    assert proc.returncode == 5, proc.stderr[-3000:]
    assert "refusing to load" in proc.stderr and "posix.system" in proc.stderr
    assert not marker.exists(), "the tampered checkpoint ran code"


def test_exports_are_safetensors_only(sft_run):
    out, _ = sft_run
    files = [p.name for p in (out / "hf").iterdir()]
    assert "model.safetensors" in files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))]
    from vlmscale.config import SFTConfig, load_config

    assert load_config(SFTConfig).model.trust_remote_code is False


# ---------------------------------------------------------------------------------------- preemption


def test_sigterm_commits_a_checkpoint_and_the_relaunch_matches(tmp_path, reference, demo_dir, start_model):
    """SIGTERM to every process of the job once step 7 is logged (what Slurm does on preemption)."""
    import subprocess

    from tests.helpers import REPO, deepspeed_cmd, port

    out = tmp_path / "preempted"
    cmd = deepspeed_cmd(2, port(29600, 300), str(REPO / "recipes" / "sft.py"), *_overrides(demo_dir, out, start_model),
                        runner=True)  # the real `deepspeed` command: the signal goes to its whole process group
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "VLMSCALE_FAULT": "stall@step>=8"}  # steps from 8 on take a second: the signal lands mid-run
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    deadline = time.time() + 180
    while time.time() < deadline:
        if (out / "metrics.jsonl").exists() and any(r.get("step", 0) >= 7 for r in metrics(out)):
            break
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGTERM)
    log, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "stopped by SIGTERM after step" in log, log[-3000:]
    stopped = max(r["step"] for r in metrics(out) if "loss" in r)
    tag = f"step-{stopped:08d}"
    assert (out / "checkpoints" / tag / "COMMITTED").is_file(), sorted(_ckpts(out))
    assert stopped % 5 != 0, "stopped on a regular checkpoint step; the test would not show the signal's checkpoint"
    relaunch = launch("sft", *_overrides(demo_dir, out, start_model), "resume=latest")
    assert f"resumed from {tag} at step {stopped}" in relaunch.stderr
    ref, got = losses(reference), losses(out)
    assert [got[s] for s in range(1, STEPS + 1)] == [ref[s] for s in range(1, STEPS + 1)]
    assert _sample_ids(out) == _sample_ids(reference)


# ---------------------------------------------------------------------------------------- failures shared across ranks
# Each rank is started as its own process (tests.helpers.launch_ranks), as on separate nodes: no launcher
# terminates the others when one exits, so every rank must learn of the failure itself.


def _no_leftovers(out: Path) -> None:
    deadline = time.time() + 10  # a DataLoader worker notices its rank is gone within 5 s
    while (left := _leftovers(str(out))) and time.time() < deadline:
        time.sleep(0.5)
    for p in left:
        os.kill(p.pid, signal.SIGKILL)
    assert not left, f"processes left behind: {[p.pid for p in left]}"


def test_a_missing_path_on_one_rank_stops_every_rank(tmp_path, demo_dir, start_model):
    from tests.helpers import launch_ranks

    out = tmp_path / "missing"
    args = _overrides(demo_dir, out, start_model, "train.max_steps=2")
    ranks = launch_ranks("sft", [args, [*args, f"model.init_from={tmp_path / 'only-on-rank-0'}"]], timeout=120)
    _no_leftovers(out)
    assert [r["code"] for r in ranks] == [2, 2], [r["log"][-2000:] for r in ranks]
    assert all(r["seconds"] < 60 for r in ranks), [r["seconds"] for r in ranks]
    assert "config error (rank 1 on " in ranks[1]["log"] and "only-on-rank-0" in ranks[1]["log"]
    assert "other ranks failed their pre-launch checks" in ranks[0]["log"]
    assert "rank 1 on " in ranks[0]["log"] and "only-on-rank-0" in ranks[0]["log"]
    print(f"missing path on rank 1: exits after {[round(r['seconds']) for r in ranks]} s (shared 2-core machine)")


def test_an_exception_on_one_rank_stops_every_rank_with_its_code(tmp_path, demo_dir, start_model):
    from tests.helpers import launch_ranks

    out = tmp_path / "raise"
    args = _overrides(demo_dir, out, start_model, "train.max_steps=4")
    ranks = launch_ranks("sft", [args, args], env={"VLMSCALE_FAULT": "raise@step=3,rank=1"}, timeout=240)
    _no_leftovers(out)
    assert [r["code"] for r in ranks] == [1, 1], [r["log"][-2000:] for r in ranks]
    assert "InjectedFault: injected fault raise@step=3 on rank 1" in ranks[1]["log"]
    assert "rank 1 on " in ranks[0]["log"] and "InjectedFault" in ranks[0]["log"]
    assert [r["step"] for r in metrics(out) if "loss" in r][-1] == 2
    spread = abs(ranks[0]["seconds"] - ranks[1]["seconds"])
    assert spread < 60, [r["seconds"] for r in ranks]
    print(f"exception on rank 1 at step 3: rank 0 exited {spread:.1f} s after rank 1 (shared 2-core machine)")


def test_consecutive_bad_samples_on_one_rank_exit_3_on_every_rank(tmp_path, demo_dir, start_model):
    from tests.helpers import launch_ranks
    from vlmscale.data.shards import ShardDataset, ShardWriter

    src, bad = ShardDataset(demo_dir / "train" / "captions"), tmp_path / "all_bad"
    w = ShardWriter(bad)
    for i in range(20):  # each names an image its shard does not hold
        w.write(f"bad{i}", {"json": src.read(i)[1]["json"]})
    w.close()
    out = tmp_path / "bad"
    args = _overrides(demo_dir, out, start_model, "train.max_steps=2")
    ranks = launch_ranks("sft", [args, [*args, f"data.sources=[{{name: bad, path: '{bad}', weight: 1}}]"]], timeout=120)
    _no_leftovers(out)
    assert [r["code"] for r in ranks] == [3, 3], ranks[1]["log"][-8000:]
    assert "16 consecutive bad samples" in ranks[1]["log"]
    assert "rank 1 on " in ranks[0]["log"] and "consecutive bad samples" in ranks[0]["log"]
    assert abs(ranks[0]["seconds"] - ranks[1]["seconds"]) < 60


def test_offline_universal_conversion(tmp_path, reference):
    """`vlmscale ckpt convert` on the reference's newest checkpoint; prints the time per GB."""
    import shutil
    import subprocess
    import sys

    from tests.helpers import REPO

    out = tmp_path / "convert"
    shutil.copytree(reference / "checkpoints", out / "checkpoints")
    proc = subprocess.run([sys.executable, "-m", "vlmscale.cli", "ckpt", "convert", str(out), "--to", "universal",
                           "--workers", "2"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["tag"] == "step-00000020"
    assert (out / "checkpoints" / "step-00000020" / "universal" / "zero").is_dir()
    print(f"offline universal conversion: {result['gb']:.3f} GB in {result['seconds']:.1f} s = "
          f"{result['seconds_per_gb']:.0f} s/GB with 2 workers (tiny model, shared 2-core machine)")


def _other(precision: str) -> str:
    return {"bf16": "fp32", "fp32": "bf16"}[precision]


def test_resume_across_precisions_is_clean_or_exit_2(tmp_path, reference, demo_dir, start_model):
    """A bf16 checkpoint relaunched in fp32 and the reverse: exit 2 naming the fix (no traceback), before
    any process group; ``auto`` keeps the checkpoint's precision and resumes."""
    import shutil

    saved = json.loads((reference / "checkpoints" / "step-00000020" / "COMMITTED").read_text())["precision"]
    copy = tmp_path / "copy"
    shutil.copytree(reference / "checkpoints", copy / "checkpoints")
    t0 = time.time()
    proc = launch("sft", *_overrides(demo_dir, copy, start_model, f"train.precision={_other(saved)}"), check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"Set train.precision={saved} (or auto) to resume it" in proc.stderr and "Traceback" not in proc.stderr
    assert time.time() - t0 < 120  # refused before any process group: no rendezvous, no engine

    # the reverse direction: a checkpoint in the other precision, relaunched in this one
    other = tmp_path / "other"
    short = ["train.max_steps=2", "checkpoint.every_steps=2"]
    launch("sft", *_overrides(demo_dir, other, start_model, f"train.precision={_other(saved)}", *short))
    meta = json.loads((other / "checkpoints" / "step-00000002" / "COMMITTED").read_text())
    assert meta["precision"] == _other(saved)
    proc = launch("sft", *_overrides(demo_dir, other, start_model, f"train.precision={saved}", "train.max_steps=3"),
                  check=False)
    assert proc.returncode == 2 and f"Set train.precision={_other(saved)} (or auto)" in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    proc = launch("sft", *_overrides(demo_dir, other, start_model, "train.max_steps=3"))  # auto
    assert f"precision: {_other(saved)} (kept the checkpoint's {_other(saved)}" in proc.stderr
    assert "resumed from step-00000002 at step 2" in proc.stderr
