"""Joint supervised fine-tuning of an InternVL-style VLM under DeepSpeed ZeRO-3.

Trains on a weighted mixture of conversation shards (images anywhere, any count) re-blended with
text-only data, then exports a Hugging Face model. With no arguments it trains the built-in demo
model on the built-in demo data (generated on first use)::

    deepspeed --num_gpus 2 recipes/sft.py
    deepspeed recipes/sft.py --config recipes/configs/sft_demo.yaml train.max_steps=100

Outputs (all under ``output_dir``): config.yaml, metrics.jsonl, tensorboard/, checkpoints/,
hf/ (safetensors + tokenizer + processor) and eval.json. Re-running the same command resumes
from the newest complete checkpoint (``resume=auto``).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

from tqdm import tqdm

from vlmscale.config import ConfigError, SFTConfig, load_config, parse_cli
from vlmscale.data.dataset import TooManyBadSamples, check_bad_fraction, resolve_path
from vlmscale.engine.distributed import device, sum_counts
from vlmscale.engine.setup import make_loader, setup_run
from vlmscale.engine.trainer import export_hf, train_step

log = logging.getLogger("vlmscale.sft")


def main(argv: list[str]) -> int:
    # ---------------------------------------------------------------- config (before any process group)
    config_path, overrides = parse_cli(argv)
    try:
        cfg = load_config(SFTConfig, path=config_path, overrides=overrides)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2

    # ---------------------------------------------------------------- build
    run = setup_run(cfg)
    engine, dist = run.engine, run.dist
    loader = make_loader(run)
    batches = iter(loader)
    dev = device()
    samples_seen = int(run.client_state.get("samples_seen", 0))
    tokens_seen = int(run.client_state.get("tokens_seen", 0))
    bad_seen = int(run.client_state.get("bad_seen", 0))
    read_seen = int(run.client_state.get("read_seen", 0))
    # per-rank skip counts by reason; rank 0 carries the resumed run's global totals
    skipped: dict[str, int] = dict(run.client_state.get("skipped", {})) if dist.is_main else {}

    def client_state(step: int) -> dict:
        return {"step": step, "samples_seen": samples_seen, "tokens_seen": tokens_seen, "bad_seen": bad_seen,
                "read_seen": read_seen, "skipped": sum_counts(skipped), "data_position": samples_seen,
                "world_size": dist.world_size}

    # ---------------------------------------------------------------- train
    engine.train()
    bar = tqdm(total=cfg.train.max_steps, initial=run.start_step, disable=not dist.is_main, desc="sft", dynamic_ncols=True)
    window_t0, window_tokens, data_wait = time.time(), 0, 0.0
    for step in range(run.start_step, cfg.train.max_steps):
        t_wait = time.time()
        micro = [next(batches) for _ in range(cfg.train.grad_accum_steps)]
        data_wait += time.time() - t_wait
        stats = train_step(engine, micro, device=dev)
        samples_seen += stats.samples
        tokens_seen += stats.tokens
        bad_seen += stats.bad
        read_seen += stats.read
        window_tokens += stats.tokens
        for k, v in stats.skipped.items():
            skipped[k] = skipped.get(k, 0) + v
        check_bad_fraction(bad=bad_seen, read=read_seen, data=cfg.data)
        done = step + 1
        bar.update(1)
        bar.set_postfix(loss=f"{stats.loss:.3f}")
        if done % cfg.train.log_every_steps == 0 or done == cfg.train.max_steps:
            elapsed = time.time() - window_t0
            record = {
                "step": done, "loss": stats.loss, "lr": engine.get_lr()[0], "grad_norm": stats.grad_norm,
                "samples": samples_seen, "tokens": tokens_seen, "tokens_per_s": window_tokens / max(elapsed, 1e-9),
                "supervised_tokens": stats.supervised, "bad_samples": bad_seen,
                "data_wait_fraction": data_wait / max(elapsed, 1e-9),
            }
            record.update({f"skipped/{k}": v for k, v in sum_counts(skipped).items()})
            run.metrics.log(record)
            window_t0, window_tokens, data_wait = time.time(), 0, 0.0
        if done % cfg.checkpoint.every_steps == 0 or done == cfg.train.max_steps:
            run.checkpoints.save(engine, step=done, client_state=client_state(done))
    bar.close()
    total_skipped = sum_counts(skipped)
    if total_skipped:
        log.warning("skipped samples by reason: %s", total_skipped)

    # ---------------------------------------------------------------- export + eval
    out = Path(cfg.output_dir)
    if cfg.checkpoint.export:
        export_hf(engine, assets=run.assets, out_dir=out / "hf",
                  meta={"stage": cfg.stage, "steps": cfg.train.max_steps, "samples_seen": samples_seen})
    if cfg.eval.at_end and cfg.checkpoint.export:
        from vlmscale.eval.suites import format_table, run_suites
        from vlmscale.model.build import load_pretrained

        model, assets = load_pretrained(str(out / "hf"), max_tiles=cfg.data.max_tiles, dtype=engine.module.dtype)
        results = run_suites(model, assets, resolve_path(cfg.data.heldout, cfg.data), cfg.eval.suites, dist=dist,
                             max_samples=cfg.eval.max_samples, max_new_tokens=cfg.eval.max_new_tokens)
        if dist.is_main:
            (out / "eval.json").write_text(json.dumps(results, indent=2))
            log.info("held-out evaluation:\n%s", format_table(results))
    run.metrics.close()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except TooManyBadSamples as exc:
        log.error("stopping: %s", exc)
        sys.exit(3)
