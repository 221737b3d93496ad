"""Diagonal Fisher information of a model on a dataset, estimated under ZeRO-3 on any number of ranks.

    vlmscale ewc fisher --model runs/sft-demo/hf --data data/demo/train/vqa --out runs/ewc-vqa --samples 512
    deepspeed --num_gpus 2 --no_local_rank --module vlmscale.cli ewc fisher --model ... --data ... --out ...

What is estimated (the *empirical* Fisher): for each of N samples with its dataset labels, ``g_i``
is the gradient of the sample's log-likelihood (minus the sum of its supervised-token
cross-entropies); ``F = 1/N sum_i g_i * g_i``, elementwise. The labels come from the data rather
than being sampled from the model (which would be the "true" Fisher), and every sample is squared
on its own: this is not the squared gradient of a mini-batch mean, which shrinks with the batch
size (and so would change with the world size).

How, under ZeRO-3: in every round each rank back-propagates one sample. A hook on each protected
parameter squares that rank's own gradient before ZeRO-3 reduce-scatters it, so the partition a
rank receives is the mean over ranks of per-sample squared gradients; ``world`` times it is their
sum. No rank ever holds more than its partition of F. When N is not a multiple of the world size,
the last round's idle ranks run a placeholder with zero weight (ZeRO-3 collectives must match).
The anchor ``theta*`` is the model's weights (the optimizer's fp32 master partition, i.e. the
loaded weights). An SGD optimizer with learning rate 0 only provides ZeRO-3's partitioned
gradients: the weights never change.
"""

from __future__ import annotations

import json
import logging
import random
import time

import deepspeed
import torch

from vlmscale.config.schema import VideoConfig
from vlmscale.constants import IGNORE
from vlmscale.data.dataset import Item, collate
from vlmscale.data.render import BadSample, Rendered, render_sample
from vlmscale.data.shards import ShardDataset
from vlmscale.distributed.group import (
    DistInfo,
    all_reduce_sum,
    barrier,
    dealt_rounds,
    gather_to_main,
    model_device,
    sum_counts,
)
from vlmscale.distributed.zero import (
    zero3_config,
    local_fp32_param,
    local_grad,
    local_range,
    set_local_grad,
    zero3_model_scope,
)
from vlmscale.model.build import load_pretrained
from vlmscale.model.forward import token_losses, vlm_logits
from vlmscale.model.policy import module_of
from vlmscale.precision import torch_dtype
from vlmscale.regularize.ewc import PARAM_SETS, protects, write_files

log = logging.getLogger(__name__)
ESTIMATOR = ("empirical Fisher: mean over samples of the elementwise squared gradient of each sample's "
             "log-likelihood (sum over its supervised tokens, dataset labels)")


def sample_indices(available: int, n: int, *, seed: int) -> list[int]:
    """The ``n`` samples (all if fewer) used for the estimate: a seeded subset, in file order."""
    if n >= available:
        return list(range(available))
    return sorted(random.Random(seed).sample(range(available), n))


def _render(data: ShardDataset, index: int, assets, *, max_seq_len: int):
    """The rendered sample, or the reason it cannot be used."""
    try:
        _, members = data.read(index)
        return render_sample(json.loads(members["json"]), members, assets, max_seq_len=max_seq_len,
                             video=VideoConfig()), None
    except BadSample as exc:
        return None, exc.reason
    except (OSError, KeyError, TypeError, AttributeError, ValueError) as exc:  # unreadable / malformed record
        log.warning("fisher: skipping sample %d: %r", index, exc)
        return None, "bad_schema"


def _placeholder(assets):
    """A two-token text sample with nothing supervised: the same collectives, a zero gradient."""
    eos = assets.tokenizer.eos_token_id
    return Rendered(input_ids=[eos, eos], labels=[IGNORE, IGNORE], pixel_values=None)


def estimate_fisher(*, model_dir: str, data_dir: str, out_dir: str, dist: DistInfo, num_samples: int,
                    params: str = "llm", dtype: torch.dtype | None = None, seed: int = 0,
                    max_seq_len: int = 4096, deepspeed_config: str = "ds_configs/zero3.json") -> dict:
    """Estimate F for the ``params`` set, write it with the anchor weights to ``out_dir`` (collective)."""
    assert params in PARAM_SETS, params
    t0 = time.time()
    dtype = dtype or torch_dtype("auto")
    # ---------------------------------------------------------------- build (partitioned)
    ds_config = zero3_config(deepspeed_config, world_size=dist.world_size, dtype=dtype)
    with zero3_model_scope(ds_config):
        model, assets = load_pretrained(model_dir, max_tiles=None, dtype=dtype)
    protected = [(n, p) for n, p in model.named_parameters() if protects(n, params)]
    for n, p in model.named_parameters():
        p.requires_grad_(protects(n, params))
    engine, *_ = deepspeed.initialize(model=model, config=ds_config, dist_init_required=False,
                                      optimizer=torch.optim.SGD([p for _, p in protected], lr=0.0))
    engine.eval()  # no dropout: the gradient of the model as it is
    hooks = [p.register_hook(lambda g: g * g) for _, p in protected]  # square before the reduce-scatter
    sums = {n: torch.zeros(local_range(p)[1], device=local_fp32_param(p).device) for n, p in protected}
    dev = model_device(engine.module)

    # ---------------------------------------------------------------- one sample per rank per round
    data = ShardDataset(data_dir)
    chosen = sample_indices(len(data), num_samples, seed=seed)
    pad = assets.tokenizer.pad_token_id
    used, skipped = 0, {}
    dealt = dealt_rounds(len(chosen), rank=dist.rank, world_size=dist.world_size)
    rounds = len(dealt)
    for r, i in enumerate(dealt):
        rendered, reason = _render(data, chosen[i], assets, max_seq_len=max_seq_len) if i is not None else (None, None)
        if reason is not None:
            skipped[reason] = skipped.get(reason, 0) + 1
        batch = collate([Item(rendered or _placeholder(assets), str(i), 0, [])], pad_id=pad)
        pixels = batch["pixel_values"]
        logits = vlm_logits(engine.module, input_ids=batch["input_ids"].to(dev), attention_mask=batch["attention_mask"].to(dev),
                            pixel_values=None if pixels is None else pixels.to(dev), tile_pool=batch["tile_pool"])
        nll = token_losses(logits, batch["labels"].to(dev)).sum()
        engine.backward(nll if rendered is not None else nll * 0.0)
        for n, p in protected:
            sums[n] += local_grad(p).to(sums[n].device) * dist.world_size  # the reduce averaged over ranks
            set_local_grad(p, torch.zeros_like(sums[n]))  # a parameter unused next round must not keep this one
        engine.step()  # learning rate 0: only closes the round
        used += rendered is not None
        if dist.is_main and (r + 1) % 50 == 0:
            log.info("fisher: round %d/%d (%.1fs)", r + 1, rounds, time.time() - t0)
    for h in hooks:
        h.remove()
    (total,) = all_reduce_sum([used])
    skipped = sum_counts(skipped)
    if total == 0:
        raise ValueError(f"--data {data_dir}: none of the {len(chosen)} samples could be used ({skipped})")
    fisher = {n: s / total for n, s in sums.items()}

    # ---------------------------------------------------------------- summary and save
    modules = sorted({module_of(n) for n, _ in protected})
    stats = all_reduce_sum([float(fisher[n].double().sum()) for n, _ in protected] +
                           [float((~fisher[n].isfinite()).sum()) for n, _ in protected])
    if sum(stats[len(protected):]) > 0:
        raise ValueError("the Fisher estimate has non-finite entries: the model's gradients on this data are not finite")
    numel = {m: sum(p.ds_numel for n, p in protected if module_of(n) == m) for m in modules}
    fsum = {m: sum(s for (n, _), s in zip(protected, stats) if module_of(n) == m) for m in modules}
    meta = {"estimator": ESTIMATOR, "params": params, "samples": int(total), "requested": num_samples,
            "available": len(data), "skipped": skipped, "model": str(model_dir), "data": str(data_dir), "seed": seed,
            "max_seq_len": max_seq_len, "dtype": str(dtype).replace("torch.", ""), "world_size": dist.world_size,
            "numel": numel, "fisher_mean": {m: fsum[m] / max(numel[m], 1) for m in modules},
            "seconds": round(time.time() - t0, 1)}

    def full_tensors():
        """Collective: every rank steps through it; only rank 0 receives (and yields) full tensors."""
        for n, p in protected:
            f = _gather(fisher[n], p, dist=dist)
            a = _gather(local_fp32_param(p).detach().float().clone(), p, dist=dist)
            if dist.is_main:
                yield n, f, a

    if dist.is_main:
        write_files(out_dir, full_tensors(), meta=meta)
        log.info("fisher: %d samples, %s -> %s in %.1fs", total, json.dumps(meta["fisher_mean"]), out_dir,
                 time.time() - t0)
    else:
        for _ in full_tensors():
            pass
    barrier()
    return meta


def _gather(local: torch.Tensor, p: torch.Tensor, *, dist: DistInfo) -> torch.Tensor | None:
    """The full tensor of parameter ``p`` from every rank's slice, on rank 0 (None elsewhere)."""
    start, size, _ = local_range(p)
    assert start == dist.rank * size and local.numel() == size, (start, size, local.numel())
    parts = gather_to_main(local)
    if not dist.is_main:
        return None
    return torch.cat(parts)[: p.ds_numel].view(p.ds_shape)
