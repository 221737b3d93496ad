"""Launch recipes the way users do, for the distributed and end-to-end tiers."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
USED_PORTS: set[int] = set()  # master ports this session launched with (their /dev/shm buffers are removed at the end)


def port(base: int, span: int) -> int:
    """A master port for this test session, remembered for cleanup.

    ``VLMSCALE_TEST_PORTS=LO-HI`` confines it to a range (several sessions sharing one machine).
    """
    if os.environ.get("VLMSCALE_TEST_PORTS"):
        lo, hi = map(int, os.environ["VLMSCALE_TEST_PORTS"].split("-"))
        base, span = lo, hi - lo + 1
    p = base + os.getpid() % span
    USED_PORTS.add(p)
    return p


def remove_shm_buffers() -> None:
    """DeepSpeed's CPU allreduce leaves a /dev/shm buffer per rank and port when a rank is killed
    (clean exits remove theirs, see ``vlmscale.distributed.group.shutdown``)."""
    for p in USED_PORTS:
        for f in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{p}_*"):
            f.unlink(missing_ok=True)


def deepspeed_cmd(nproc: int, master_port: int, *args: str, runner: bool = False) -> list[str]:
    """``deepspeed --num_gpus N --master_port P args...`` on this node. Without ``runner``, what that runs:
    DeepSpeed's per-node launcher (``deepspeed.launcher.launch``, which starts and watches the ranks) without
    the runner process in front of it, which on one node only encodes the world info and waits (3-4 s of
    start-up and polling per launch, ~50 launches per test session). ``args`` may start with the launcher's
    own flags (``--no_local_rank``, ``--module``). The real ``deepspeed`` command stays covered by
    ``runner=True`` launches (the shared SFT run, the SIGTERM test)."""
    if runner:
        return [str(BIN / "deepspeed"), "--num_gpus", str(nproc), "--master_port", str(master_port), *args]
    world = base64.urlsafe_b64encode(json.dumps({"localhost": list(range(nproc))}).encode()).decode()
    return [sys.executable, "-u", "-m", "deepspeed.launcher.launch", f"--world_info={world}", "--master_addr=127.0.0.1",
            f"--master_port={master_port}", "--enable_each_rank_log=None", "--log_level=info", *args]


def launch(recipe: str, *overrides: str, nproc: int = 2, timeout: int = 600, check: bool = True,
           env: dict | None = None, runner: bool = False) -> subprocess.CompletedProcess:
    """``deepspeed --num_gpus N recipes/<recipe>.py overrides...`` (:func:`deepspeed_cmd`; ``python``
    directly for N=0)."""
    script = str(REPO / "recipes" / f"{recipe}.py")
    if nproc == 0:
        cmd = [sys.executable, script, *overrides]
    else:
        cmd = deepspeed_cmd(nproc, port(29600, 300), script, *overrides, runner=runner)
    full_env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc


def metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def losses(output_dir: Path) -> dict[int, float]:
    """Step -> logged loss of a run; a step logged twice (a resume that repeated one) fails the test."""
    rows = [r for r in metrics(output_dir) if "loss" in r]
    steps = [r["step"] for r in rows]
    assert len(steps) == len(set(steps)), f"a step was logged twice: {steps}"
    return {r["step"]: r["loss"] for r in rows}


def launch_ranks(recipe: str, per_rank: list[list[str]], *, timeout: int = 240, env: dict | None = None) -> list[dict]:
    """Start one ``python recipes/<recipe>.py`` per rank with its own overrides, as separate nodes would
    (no launcher that terminates the others when one exits). Returns per rank ``code`` (None: still
    running at ``timeout``, then killed, its stacks at the end of its log), ``log`` and ``seconds``."""
    import signal
    import tempfile
    import time

    world, master = len(per_rank), str(port(29600, 300))
    procs, logs, t0 = [], [], time.time()
    for rank, overrides in enumerate(per_rank):
        rank_env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1",
                    **(env or {}),
                    "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "LOCAL_SIZE": str(world),
                    "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": master}
        logs.append(tempfile.TemporaryFile("w+"))  # not a pipe: a full pipe would block the rank
        procs.append(subprocess.Popen([sys.executable, str(REPO / "recipes" / f"{recipe}.py"), *overrides], cwd=REPO,
                                      env=rank_env, stdout=subprocess.DEVNULL, stderr=logs[-1], text=True,
                                      start_new_session=True))
    finished: dict[int, float] = {}
    while len(finished) < world and time.time() - t0 < timeout:
        for rank, p in enumerate(procs):
            if rank not in finished and p.poll() is not None:
                finished[rank] = time.time() - t0
        time.sleep(0.2)
    results = []
    for rank, p in enumerate(procs):
        if rank not in finished:  # still running: its stacks into its log (faulthandler on SIGABRT), then kill
            os.kill(p.pid, signal.SIGABRT)
            time.sleep(2)
            os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        logs[rank].seek(0)
        results.append({"code": p.returncode if rank in finished else None, "log": logs[rank].read(),
                        "seconds": finished.get(rank)})
    return results


def template_ids(assets, record: dict, tiles_per_image: list[int]) -> list[int]:
    """What the exported chat template + the stock InternVL processor expansion give: the k-th image's
    ``<IMG_CONTEXT>`` becomes ``<img>`` + ``<IMG_CONTEXT>`` x (its tiles x image_seq_length) + ``</img>``."""
    from vlmscale.constants import IMG_CONTEXT

    tok = assets.tokenizer
    pieces = tok.apply_chat_template(record["messages"], tokenize=False).split(IMG_CONTEXT)
    assert len(pieces) == len(tiles_per_image) + 1, (len(pieces) - 1, tiles_per_image)
    text = pieces[0]
    for n_tiles, piece in zip(tiles_per_image, pieces[1:]):
        text += "<img>" + IMG_CONTEXT * (n_tiles * assets.image_seq_length) + "</img>" + piece
    return tok(text, add_special_tokens=False)["input_ids"]
