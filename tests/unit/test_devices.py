"""Device placement as a GPU run needs it, checked on a CPU.

A GPU run fails in two ways a CPU run cannot show: a CPU tensor handed to an NCCL collective, and a
CPU input meeting CUDA weights. Here a torch-function mode stands in for a CUDA device: tensors "on"
``cuda:0`` are CPU tensors marked as such (``.device`` reports ``cuda:0``; factories given that device,
``.to``/``.cuda`` make marked copies, ``.cpu`` unmarked ones, and results of marked inputs are marked).
The model's weights are marked, the communication device and the model device are mocked to
``cuda:0``, the collectives are patched (world size 2) to record what they are handed, and any op that
mixes marked and unmarked tensors is recorded as a device mismatch — where CUDA would raise.
The training step, every eval suite and generation (greedy, sampled, VCD) must record none.
"""

from __future__ import annotations

import traceback

import pytest
import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

from vlmscale.eval.generate import VCDConfig, generate
from vlmscale.model.build import load_pretrained

FAKE = torch.device("cuda", 0)
_PASS_THROUGH = {torch.Tensor.__getitem__, torch.Tensor.__setitem__, torch.Tensor.copy_, torch.Tensor.__repr__,
                 torch.Tensor.__format__, torch.Tensor.tolist, torch.Tensor.item, torch.Tensor.numel,
                 torch.Tensor.dim, torch.Tensor.size, torch.Tensor.__len__, torch.Tensor.__bool__,
                 torch.Tensor.__index__, torch.Tensor.__int__, torch.Tensor.__float__}


def _on(t) -> bool:
    return getattr(t, "_fake_cuda", False)


def _mark(out):
    if isinstance(out, torch.Tensor):
        out._fake_cuda = True
    elif isinstance(out, (tuple, list)):
        for o in out:
            _mark(o)
    return out


def _tensors(obj, out):
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(obj, (tuple, list)):
        for o in obj:
            _tensors(o, out)
    elif isinstance(obj, dict):
        for o in obj.values():
            _tensors(o, out)
    return out


def _is_fake(device) -> bool:
    return device is not None and not isinstance(device, torch.dtype) and torch.device(device).type == "cuda"


class FakeCuda(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.mismatches: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        prop = getattr(getattr(func, "__self__", None), "__name__", None) if func.__name__ == "__get__" else None
        if prop == "device":
            return FAKE if _on(args[0]) else func(*args)
        if prop == "is_cuda":
            return _on(args[0])
        if func in (torch.Tensor.to, torch.Tensor.cuda, torch.Tensor.cpu):
            return self._move(func, args, kwargs)
        if _is_fake(kwargs.get("device")):  # a factory asked for the device
            kwargs["device"] = "cpu"
            return _mark(func(*args, **kwargs))
        if getattr(func, "__name__", "") in ("__get__", "__set__"):
            return func(*args, **kwargs)
        tensors = _tensors((args, kwargs), [])
        on = [t for t in tensors if _on(t)]
        if func in _PASS_THROUGH:  # CUDA allows these across devices (CPU indices, copies, reads)
            out = func(*args, **kwargs)
            return _mark(out) if on else out
        off = [t for t in tensors if not _on(t) and t.dim() > 0]  # 0-dim CPU tensors mix with CUDA ones
        if on and off:
            self.mismatches.append(f"{getattr(func, '__name__', func)}: CPU {tuple(off[0].shape)} with cuda "
                                   f"{tuple(on[0].shape)}\n" + "".join(traceback.format_stack(limit=8)[:-1]))
        out = func(*args, **kwargs)
        return _mark(out) if on else out

    def _move(self, func, args, kwargs):
        t, rest = args[0], list(args[1:])
        if func is torch.Tensor.cpu:
            target = "cpu"
        elif func is torch.Tensor.cuda:
            target, rest = FAKE, []
        else:
            target = kwargs.pop("device", None)
            if rest and not isinstance(rest[0], torch.dtype) and not isinstance(rest[0], torch.Tensor):
                target = rest.pop(0)
        if target is None:  # a dtype change only: stays where it is
            out = torch.Tensor.to(t, *rest, **kwargs)
            return _mark(out) if _on(t) else out
        want_fake = _is_fake(target)
        if want_fake == _on(t):
            out = torch.Tensor.to(t, *rest, **kwargs)
            return _mark(out) if want_fake else out
        out = torch.Tensor.to(t, *rest, **kwargs, copy=True)
        if want_fake:
            return _mark(out)
        out._fake_cuda = False
        return out


@pytest.fixture
def fake_gpu(monkeypatch, tiny_export):
    """``(model, assets, mode, handed)``: the tiny model "on cuda:0" in fp32, collectives of a 2-rank NCCL
    group recording the devices of what they are handed."""
    from vlmscale.distributed import group as distributed
    model, assets = load_pretrained(str(tiny_export), max_tiles=None, dtype=torch.float32)
    for t in [*model.parameters(), *model.buffers()]:
        t._fake_cuda = True
    handed: list[torch.device] = []

    def all_reduce(t, op=None, **_):
        handed.append(t.device)

    def all_gather_object(out, obj, **_):
        handed.append("object")  # torch moves pickled objects to the backend's device itself
        out[:] = [obj] * len(out)

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda *a, **k: 2)
    monkeypatch.setattr(dist, "get_rank", lambda *a, **k: 0)
    monkeypatch.setattr(dist, "get_backend", lambda *a, **k: "nccl")
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    monkeypatch.setattr(dist, "all_gather_object", all_gather_object)
    monkeypatch.setattr(distributed, "comm_device", lambda: FAKE, raising=False)
    monkeypatch.setattr(distributed, "model_device", lambda model: FAKE, raising=False)
    return model, assets, FakeCuda(), handed


def _check(mode: FakeCuda, handed: list) -> None:
    assert not mode.mismatches, "device mismatches:\n" + "\n".join(mode.mismatches[:3])
    tensors = [d for d in handed if d != "object"]
    assert tensors, "no collective was called: the test did not exercise the multi-rank path"
    assert all(d == FAKE for d in tensors), f"tensors handed to collectives on {sorted(set(map(str, tensors)))}"


def test_the_fake_device_catches_both_mistakes(fake_gpu):
    """The harness itself: a CPU tensor in a collective and a CPU input to the model are both caught."""
    model, _, mode, handed = fake_gpu
    with mode:
        dist.all_reduce(torch.tensor([1.0]))
        model.model.get_input_embeddings()(torch.tensor([[1, 2]]))
    assert handed == [torch.device("cpu")] and len(mode.mismatches) == 1


class _Engine:
    """What ``train_step`` asks of a DeepSpeed engine, around a plain model (autograd does the rest)."""

    optimizer = None
    skipped_steps = 0
    world_size = 2

    def __init__(self, model):
        self.module = model

    def gradient_accumulation_steps(self):
        return 2

    def backward(self, loss):
        loss.backward()

    def step(self):
        pass

    def get_global_grad_norm(self):
        return 0.0


def test_train_step_keeps_tensors_on_the_device(fake_gpu, demo_dir):
    from tests.unit.engines import batches
    from vlmscale.train.step import train_step

    model, assets, mode, handed = fake_gpu
    micro = batches(demo_dir / "train" / "vqa", assets, [[0, 1]]) + batches(demo_dir / "train" / "text", assets, [[0]])
    assert micro[1]["pixel_values"] is None  # a text-only micro-batch: the blank tile
    with mode:
        train_step(_Engine(model), micro, device=FAKE)
    _check(mode, handed)


def test_eval_suites_keep_tensors_on_the_device(fake_gpu, demo_dir):
    from vlmscale.eval.suites import drift_reference, run_suites

    model, assets, mode, handed = fake_gpu
    heldout = demo_dir / "heldout"
    with mode:
        reference = drift_reference(model, assets, heldout, max_samples=1, rank=0, world_size=2)
        run_suites(model, assets, heldout, ["vqa", "grounding", "pope", "text", "caption", "drift"], rank=0,
                   world_size=2, max_samples=1, max_new_tokens=3, reference=reference)  # one batch each: rank 1 runs placeholders
    _check(mode, handed)


@pytest.mark.parametrize("kind", ["greedy", "sampled", "vcd"])
def test_generation_keeps_tensors_on_the_device(fake_gpu, demo_dir, kind):
    import json

    from vlmscale.data.render import render_prompt
    from vlmscale.data.shards import ShardDataset

    model, assets, mode, handed = fake_gpu
    data = ShardDataset(demo_dir / "heldout" / "vqa")
    prompts = []
    for i in range(3):
        _, members = data.read(i)
        prompts.append(render_prompt(json.loads(members["json"])["messages"][:1], members, assets))
    options = {"greedy": {}, "vcd": {"vcd": VCDConfig()},
               "sampled": {"temperature": 1.0, "generator": torch.Generator().manual_seed(0), "local": True,
                           "banned": [assets.tokenizer.pad_token_id]}}[kind]
    with mode:
        generate(model, assets, prompts, max_new_tokens=3, rank=0, world_size=2, **options)
    _check(mode, handed)
