import torch

from vlmscale.data.render import Rendered
from vlmscale.eval.generate import VCDConfig, _next_tokens
from vlmscale.eval.generate_legacy import plan_batches
from vlmscale.eval.suites import compare, flatten


class _Logits:
    def __init__(self, logits):
        self.logits = torch.tensor(logits)


def test_vcd_hand_computed():
    with_image = _Logits([[2.0, 1.9, -5.0]])  # p ~ [0.52, 0.48, 0.0003]
    noised = _Logits([[2.0, 0.0, 3.0]])
    vcd = VCDConfig(alpha=1.0, beta=0.1)
    # (1+a)*l - a*l' = [2.0, 3.8, -13.0]; token 2 is implausible under l(v) anyway
    assert _next_tokens(with_image, noised, vcd).tolist() == [1]
    assert _next_tokens(with_image, None, None).tolist() == [0]  # plain greedy


def test_vcd_plausibility_cut_blocks_contrast_artifacts():
    with_image = _Logits([[5.0, 0.0, 1.0]])
    noised = _Logits([[5.0, -10.0, 1.0]])  # contrast would pick token 1 (5 + 10), but p(1|v) is tiny
    assert _next_tokens(with_image, noised, VCDConfig(alpha=1.0, beta=0.1)).tolist() == [0]


def test_legacy_batches_do_not_depend_on_world_size():
    prompts = [Rendered(input_ids=[0] * n, labels=[], pixel_values=None) for n in (3, 5, 3, 3, 5, 4)]
    batches = plan_batches(prompts, batch_size=2)
    assert batches == [[0, 2], [3], [5], [1, 4]]


def test_flatten_and_compare():
    a = {"vqa": {"colour": {"accuracy": 0.5, "n": 10}}, "vqa_examples": [{"q": "x"}]}
    b = {"vqa": {"colour": {"accuracy": 0.75, "n": 10}}}
    assert flatten(a) == {"eval/vqa/colour/accuracy": 0.5, "eval/vqa/colour/n": 10.0}
    table = compare(a, b)
    assert "vqa/colour/accuracy" in table and "+0.2500" in table


def test_sampling_follows_the_tempered_distribution_and_the_generator():
    logits = _Logits([[0.0, 0.0, 2.0]] * 4000)
    draw = _next_tokens(logits, None, None, temperature=2.0, generator=torch.Generator().manual_seed(0))
    # softmax([0, 0, 1]) = [0.212, 0.212, 0.576]
    share = torch.bincount(draw, minlength=3).float() / len(draw)
    assert torch.allclose(share, torch.tensor([0.212, 0.212, 0.576]), atol=0.03), share
    again = _next_tokens(logits, None, None, temperature=2.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(draw, again)  # a rollout is a pure function of the generator's seed


def test_banned_tokens_are_never_generated():
    logits = _Logits([[5.0, 0.0, 1.0]] * 200)
    ban = torch.tensor([0])
    assert 0 not in _next_tokens(logits, None, None, banned=ban).tolist()
    draw = _next_tokens(logits, None, None, temperature=3.0, generator=torch.Generator().manual_seed(0), banned=ban)
    assert 0 not in draw.tolist() and set(draw.tolist()) == {1, 2}
