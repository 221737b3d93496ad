"""The hallucination-prone demo variant: its co-occurrence statistics and POPE's adversarial split."""

import json
from collections import Counter

import pytest

from vlmscale.data.cooccur import ANCHORS, generate_cooccur
from vlmscale.data.shards import ShardDataset
from vlmscale.demo_vocab import PARTNER


def _records(path):
    ds = ShardDataset(path)
    return [json.loads(ds.read(i)[1]["json"]) for i in range(len(ds))]


@pytest.fixture(scope="module")
def cooccur(tmp_path_factory):
    out = tmp_path_factory.mktemp("cooccur")
    generate_cooccur(out, num_train_scenes=300, num_heldout_scenes=80, seed=0)
    return out


def _named(text, obj):
    return f"{obj[0]} {obj[1]}" in text


def test_training_captions_carry_the_cooccurrence_prior(cooccur):
    drawn = Counter()
    said = Counter()
    for rec in _records(cooccur / "train" / "captions"):
        objs = {tuple(o) for o in rec["objects"]}
        anchor = next(a for a in ANCHORS if a in objs)
        text = rec["messages"][1]["content"][0]["text"]
        drawn[PARTNER[anchor] in objs] += 1
        said[_named(text, PARTNER[anchor])] += 1
    n = sum(drawn.values())
    assert 0.72 <= drawn[True] / n <= 0.88  # rate 0.8: the partner is drawn with its anchor
    assert said[True] / n >= 0.93  # and named even more often (caption noise, leak 0.8: 0.96 expected)
    assert drawn[False] > 0  # but not always


def test_adversarial_split_asks_for_the_missing_partner(cooccur):
    pope = _records(cooccur / "heldout" / "pope")
    splits = Counter(r["split"] for r in pope)
    assert set(splits) == {"random", "popular", "adversarial"}
    for rec in pope:
        objs = {tuple(o) for o in rec["objects"]}
        anchor = tuple(rec["anchor"])
        assert anchor in objs and PARTNER[anchor] not in objs  # held-out scenes lack the partner
        question = rec["messages"][0]["content"][1]["text"]
        asked = any(_named(question, o) for o in objs)
        assert asked == (rec["answer"] == "yes")
        if rec["split"] == "adversarial" and rec["answer"] == "no":
            assert _named(question, PARTNER[anchor])
    for split in splits:
        answers = Counter(r["answer"] for r in pope if r["split"] == split)
        assert 0.3 < answers["yes"] / sum(answers.values()) < 0.7


def test_dpo_pairs_reject_the_hallucinated_partner(cooccur, tiny_assets):
    from vlmscale.data.preference import render_pair  # what the DPO stage renders a pair with

    ds = ShardDataset(cooccur / "heldout" / "pref")
    _, members = ds.read(0)
    assert render_pair(json.loads(members["json"]), members, tiny_assets, max_seq_len=4096) is not None
    pairs = _records(cooccur / "heldout" / "pref")
    assert len(pairs) == 80
    for rec in pairs:
        objs = {tuple(o) for o in rec["objects"]}
        anchor = next(a for a in ANCHORS if a in objs)
        assert not _named(rec["chosen"], PARTNER[anchor]) and _named(rec["rejected"], PARTNER[anchor])


def test_rl_probes_have_verifiable_answers_the_prior_cannot_give(cooccur):
    probes = _records(cooccur / "train" / "probe")
    assert len(probes) == 300 // 4
    kinds = Counter(r["kind"] for r in probes)
    assert set(kinds) == {"partner", "present", "absent"}
    for rec in probes:
        objs = {tuple(o) for o in rec["objects"]}
        question = rec["messages"][0]["content"][1]["text"]
        asked = tuple(question.removeprefix("Is there a ").removesuffix(" in the image?").split())
        assert rec["messages"][1]["content"][0]["text"] == rec["answer"]
        assert (asked in objs) == (rec["answer"] == "yes")
        if rec["kind"] == "partner":
            assert asked == PARTNER[tuple(rec["anchor"])]
    partner = [r["answer"] for r in probes if r["kind"] == "partner"]
    assert 0.25 < partner.count("yes") / len(partner) < 0.75  # the prior does not tell the answer


def _partner_probes(path):
    """(partner drawn, answer) of every VQA turn asking about the scene's anchor's partner."""
    out = []
    for rec in _records(path):
        objs = {tuple(o) for o in rec["objects"]}
        partner = PARTNER[next(a for a in ANCHORS if a in objs)]
        msgs = rec["messages"]
        for user, answer in zip(msgs[::2], msgs[1::2]):
            question = next(c["text"] for c in user["content"] if c["type"] == "text")
            if question == f"Is there a {partner[0]} {partner[1]} in the image?":
                out.append((partner in objs, answer["content"][0]["text"]))
    return out


def test_vqa_written_from_the_captions_carries_the_prior_into_yes_no(cooccur, tmp_path):
    absent = [a for drawn, a in _partner_probes(cooccur / "train" / "vqa") if not drawn]
    assert absent and absent.count("yes") / len(absent) > 0.6  # leak 0.8: mostly "yes" though it is not drawn
    generate_cooccur(tmp_path, num_train_scenes=300, num_heldout_scenes=4, seed=0, vqa_from_captions=False)
    truthful = _partner_probes(tmp_path / "train" / "vqa")
    assert truthful and all((a == "yes") == drawn for drawn, a in truthful)
