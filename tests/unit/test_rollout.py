"""The batched decoder (left padding, KV cache, per-prompt generators) against the previous equal-length one."""

import json

import pytest
import torch

from vlmscale.config import SFTConfig, load_config
from vlmscale.data.render import render_prompt
from vlmscale.data.shards import ShardDataset
from vlmscale.eval import generate_legacy
from vlmscale.eval.generate import left_pad, plan_batches, rollout, top_p_filter
from vlmscale.model.build import build_model, load_weights_plain
from vlmscale.model.forward import vlm_logits


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = load_config(SFTConfig, overrides=["model.preset=tiny"])
    model, assets = build_model(cfg.model, max_tiles=2, dtype=torch.float32, load_weights=load_weights_plain)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # larger random weights, so greedy decoding does not just repeat one token
        for name, p in model.named_parameters():
            if p.dim() == 2 and "norm" not in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model.eval(), assets


@pytest.fixture(scope="module")
def prompts(demo_dir, tiny):
    _, assets = tiny
    out = []
    for suite in ("vqa", "pope", "captions", "grounding", "text"):
        ds = ShardDataset(demo_dir / "heldout" / suite)
        for i in range(3):
            _, members = ds.read(i)
            out.append(render_prompt(json.loads(members["json"])["messages"][:1], members, assets))
    assert len({len(p.input_ids) for p in out}) >= 4  # unequal lengths, some without images
    assert any(p.pixel_values is None for p in out)
    return out


def test_plan_batches_sorts_by_length_and_keeps_unequal_lengths_together():
    from vlmscale.data.render import Rendered

    prompts = [Rendered(input_ids=[0] * n, labels=[], pixel_values=None) for n in (3, 5, 3, 3, 5, 4)]
    assert plan_batches(prompts, batch_size=4) == [[0, 2, 3, 5], [1, 4]]


def test_left_pad():
    ids, mask = left_pad([[1, 2, 3], [4]], pad=0)
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_greedy_matches_the_equal_length_decoder_row_by_row(tiny, prompts):
    model, assets = tiny
    old = generate_legacy.generate(model, assets, prompts, max_new_tokens=10, return_ids=True)
    new = rollout(model, assets, prompts, max_new_tokens=10, batch_size=16)
    assert new.tokens == old
    assert len({t for ids in new.tokens.values() for t in ids}) > 3  # not one repeated token
    # batch composition does not matter either
    small = rollout(model, assets, prompts, max_new_tokens=10, batch_size=4)
    assert small.tokens == old


def test_logprobs_are_the_full_forwards(tiny, prompts):
    """The returned log-probabilities equal a fresh (uncached, unpadded) forward over prompt + response."""
    model, assets = tiny
    res = rollout(model, assets, prompts, max_new_tokens=6, temperature=1.3, seeds=list(range(len(prompts))),
                  return_logprobs=True)
    for j in (0, 4, 9, 13):
        p, toks = prompts[j], res.tokens[j]
        ids = torch.tensor([p.input_ids + toks])
        with torch.no_grad():
            logits = vlm_logits(model, input_ids=ids, attention_mask=None, pixel_values=p.pixel_values)[0].float()
        start = len(p.input_ids) - 1
        ref = (logits[start: start + len(toks)] / 1.3).log_softmax(-1).gather(-1, torch.tensor(toks)[:, None])[:, 0]
        assert torch.allclose(torch.tensor(res.logprobs[j]), ref, atol=1e-4), (j, res.logprobs[j], ref.tolist())


def test_sampling_does_not_depend_on_world_size_or_batching(tiny, prompts):
    model, assets = tiny
    seeds = [1000 + i for i in range(len(prompts))]
    kw = dict(max_new_tokens=8, temperature=1.0, top_p=0.9, seeds=seeds, return_logprobs=True)
    one = rollout(model, assets, prompts, batch_size=16, **kw)
    parts = [rollout(model, assets, prompts, batch_size=4, rank=r, world_size=2, **kw) for r in range(2)]
    assert set(parts[0].tokens).isdisjoint(parts[1].tokens)
    merged = {**parts[0].tokens, **parts[1].tokens}
    assert merged == one.tokens
    for part in parts:
        for j, lp in part.logprobs.items():
            assert torch.allclose(torch.tensor(lp), torch.tensor(one.logprobs[j]), atol=1e-4)
    other = rollout(model, assets, prompts, batch_size=16, **{**kw, "seeds": [s + 1 for s in seeds]})
    assert other.tokens != one.tokens


def test_generator_seeds_prompts_in_order(tiny, prompts):
    model, assets = tiny
    kw = dict(max_new_tokens=5, temperature=1.0)
    a = rollout(model, assets, prompts, generator=torch.Generator().manual_seed(3), batch_size=16, **kw)
    b = rollout(model, assets, prompts, generator=torch.Generator().manual_seed(3), batch_size=5, **kw)
    assert a.tokens == b.tokens
    with pytest.raises(ValueError, match="seeds"):
        rollout(model, assets, prompts, **kw)


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.3, 0.5, 0.05, 0.15]])
    kept = lambda p: (top_p_filter(probs, p) > 0).int().tolist()
    assert kept(0.1) == [[0, 1, 0, 0]]  # the most likely token is always kept
    assert kept(0.7) == [[1, 1, 0, 0]]
    assert kept(0.9) == [[1, 1, 0, 1]]
    assert kept(1.0) == [[1, 1, 1, 1]]
    assert torch.equal(top_p_filter(probs, 0.7)[0, :2], probs[0, :2])  # kept mass unchanged


def test_eos_stops_each_row(tiny, prompts):
    model, assets = tiny
    greedy = rollout(model, assets, prompts, max_new_tokens=10)
    first = greedy.tokens[0][0]  # make prompt 0's first token the end of sequence: it stops, others go on
    res = rollout(model, assets, prompts, max_new_tokens=10, eos_token_id=first)
    assert res.tokens[0] == [first]
    assert all(ids == greedy.tokens[j][: len(ids)] for j, ids in res.tokens.items())
    assert max(len(ids) for ids in res.tokens.values()) > 1


def _trace(engine):
    coord = engine.optimizer.parameter_offload.get_param_coordinator()
    return coord, len(coord._PartitionedParameterCoordinator__submodule_order)


def test_per_layer_fallback_resets_the_fetch_trace_each_forward(tiny_export, demo_dir, monkeypatch):
    """Rollouts that leave ZeRO-3 to gather layer by layer (the policy above gather_policy_max_bytes) start a
    coordinator pass per forward, as DeepSpeed's own top-module hook does, so its fetch trace completes (and
    prefetching can work), which without the reset it never does; the tokens equal the gathered path's."""
    from tests.unit.engines import zero3_engine
    from vlmscale.eval import generate

    engine, assets = zero3_engine(tiny_export)
    ds = ShardDataset(demo_dir / "heldout" / "vqa")
    prompts = []
    for i in range(4):
        _, members = ds.read(i)
        prompts.append(render_prompt(json.loads(members["json"])["messages"][:1], members, assets))
    n_modules = len(list(engine.module.modules()))
    whole = rollout(engine.module, assets, prompts, max_new_tokens=6, gather_max_bytes=10**12)
    layered = rollout(engine.module, assets, prompts, max_new_tokens=6, gather_max_bytes=0)
    assert whole.gathered and not layered.gathered
    assert layered.tokens == whole.tokens
    coord, recorded = _trace(engine)
    assert coord.is_complete_trace() and recorded < n_modules

    engine2, _ = zero3_engine(tiny_export)  # the negative control: no reset between forwards
    monkeypatch.setattr(generate, "start_forward", lambda module: False)
    rollout(engine2.module, assets, prompts, max_new_tokens=6, gather_max_bytes=0)
    coord2, _ = _trace(engine2)
    assert not coord2.is_complete_trace()
