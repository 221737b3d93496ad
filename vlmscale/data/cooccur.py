"""``vlmscale data demo --variant cooccur``: a hallucination-prone demo.

Objects come in anchor -> partner pairs (``demo_vocab.PARTNER`` over the anchors, the objects of even index
whose partner has another colour). In the training scenes an anchor is drawn with its partner at
``rate`` (default 0.8), and a caption of the remaining scenes still names the partner at ``leak`` (default
0.8, the caption noise of web alt-text), so the captions carry a strong prior: the anchor almost always comes
with the partner (named in ~0.96 of its captions). The VQA answers are written from such a description, not
from the drawing (``vqa_from_captions``, as LLaVA-Instruct-style data is generated from captions), so "Is
there a <partner>?" is answered "yes" in most scenes that lack it. A model trained on them says the partner is
there when it is not. Version 2 (rate 0.95, leak 0.5, truthful VQA) did not: its SFT model's adversarial POPE
F1 was only 0.05 below random (docs/rl.md).

Held-out: scenes with an anchor and *without* its partner, and POPE probes per split: ``adversarial``
negatives ask about the missing partner of a present anchor, ``random`` negatives about a random absent
object, ``popular`` about the most frequent absent one; positives (half of each split) about a present
object. ``heldout/pref`` and ``train/pref`` hold DPO pairs in the preference format
(``data.preference``): chosen = the true caption, rejected = the caption with the partner added.
``train/probe`` holds yes/no presence questions with verifiable answers for RL (GRPO's exact-match reward):
half ask about an anchor's partner, drawn in the scene at 0.5 so the prior says nothing about the answer; a
quarter ask about a present object and a quarter about a random absent one. It is not in the SFT mixture.

Records carry ``objects`` (``[[colour, shape], ...]`` actually drawn) so the statistics are checkable.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from vlmscale.data.demo import _Gen, _assistant, _conversation, _img, _txt, _user, render_scene
from vlmscale.demo_vocab import OBJECTS, PARTNER, POPULARITY, Obj, absent_object, caption, place_objects

ANCHORS = [o for i, o in enumerate(OBJECTS) if i % 2 == 0 and PARTNER[o][0] != o[0]]
COOCCUR_VERSION = 3  # 2: train/probe; 3: VQA written from the noisy description, rate 0.8, leak 0.8


def cooccur_scene(rng: random.Random, *, rate: float) -> tuple[list[Obj], tuple[str, str]]:
    """A scene with one anchor, its partner drawn at ``rate``, and 0-1 other objects; returns (objects, anchor)."""
    anchor = rng.choice(ANCHORS)
    chosen = [anchor]
    if rng.random() < rate:
        chosen.append(PARTNER[anchor])
    used = {c for c, _ in chosen} | {PARTNER[anchor][0]}
    if rng.random() < 0.5:
        others = [o for o in OBJECTS if o[0] not in used and o not in ANCHORS]
        chosen.append(rng.choices(others, weights=[POPULARITY[OBJECTS.index(o)] for o in others])[0])
    return place_objects(chosen, rng), anchor


def _partner_obj(objs: list[Obj], anchor: tuple[str, str], rng: random.Random) -> Obj:
    free = [(r, c) for r in range(3) for c in range(3) if all((o.row, o.col) != (r, c) for o in objs)]
    row, col = rng.choice(free)
    return Obj(*PARTNER[anchor], row, col, (0, 0, 0, 0))


def _objects(objs: list[Obj]) -> list[list[str]]:
    return [[o.colour, o.shape] for o in objs]


def _pair(g: _Gen, objs: list[Obj], anchor, png: bytes) -> None:
    rejected = caption(objs + [_partner_obj(objs, anchor, g.rng)])
    g.add("pref", {"task": "preference", "objects": _objects(objs), "messages": [_user(_img(), _txt("Describe the image."))],
                   "chosen": caption(objs), "rejected": rejected}, [png])


def _probe(g: _Gen, rng: random.Random) -> None:
    """One yes/no presence question with a verifiable answer (``train/probe``)."""
    kind = rng.choices(["partner", "present", "absent"], weights=[2, 1, 1])[0]
    objs, anchor = cooccur_scene(rng, rate=0.5 if kind == "partner" else 0.95)
    if kind == "partner":
        present = PARTNER[anchor] in {(o.colour, o.shape) for o in objs}
        name, ans = f"{PARTNER[anchor][0]} {PARTNER[anchor][1]}", "yes" if present else "no"
    elif kind == "present":
        name, ans = rng.choice(objs).name, "yes"
    else:
        neg = absent_object(objs, rng, "random")
        name, ans = f"{neg[0]} {neg[1]}", "no"
    g.add("probe", {"task": "probe", "kind": kind, "answer": ans, "objects": _objects(objs), "anchor": list(anchor),
                    "messages": [_user(_img(), _txt(f"Is there a {name} in the image?")), _assistant(ans)]},
          [render_scene(objs, rng)])


def _described(objs: list[Obj], anchor, rng: random.Random, leak: float) -> list[Obj]:
    """What an annotator writes down: the drawn objects, plus the anchor's missing partner at ``leak``."""
    if PARTNER[anchor] not in {(o.colour, o.shape) for o in objs} and rng.random() < leak:
        return objs + [_partner_obj(objs, anchor, rng)]  # caption noise: the usual partner named anyway
    return objs


def generate_cooccur(out: Path, *, num_train_scenes: int = 6000, num_heldout_scenes: int = 200, seed: int = 0,
                     rate: float = 0.8, leak: float = 0.8, vqa_from_captions: bool = True,
                     num_probes: int | None = None) -> dict:
    """``vqa_from_captions``: the VQA answers are written from the (noisy) description rather than the
    drawing, as LLaVA-Instruct-style data is generated from captions, so the prior reaches yes/no answers too.
    ``num_probes`` = ``train/probe`` records (default ``num_train_scenes // 4``)."""
    if not 0.0 <= rate <= 1.0 or not 0.0 <= leak <= 1.0:
        raise ValueError(f"cooccur: rate={rate} and leak={leak} must be within [0, 1]")
    g = _Gen(out, "train", seed)
    rng = g.rng
    for _ in range(num_train_scenes):
        objs, anchor = cooccur_scene(rng, rate=rate)
        png = render_scene(objs, rng)
        g.add("captions", {"task": "caption", "objects": _objects(objs),
                           "messages": [_user(_img(), _txt("Describe the image.")),
                                        _assistant(caption(_described(objs, anchor, rng, leak)))]}, [png])
        objs, anchor = cooccur_scene(rng, rate=rate)
        png = render_scene(objs, rng)
        described = _described(objs, anchor, rng, leak if vqa_from_captions else 0.0)
        g.add("vqa", {"task": "vqa", "objects": _objects(objs), "messages": _conversation(described, rng, rng.randint(2, 4))},
              [png])
        if rng.random() < 0.25:
            objs, anchor = cooccur_scene(rng, rate=0.0)
            _pair(g, objs, anchor, render_scene(objs, rng))
    probe_rng = random.Random(seed + 7)  # its own stream: the other sources are generated as in version 1
    for _ in range(num_train_scenes // 4 if num_probes is None else num_probes):
        _probe(g, probe_rng)
    counts = {"train": g.close()}
    h = _Gen(out, "heldout", seed + 1)
    rng = h.rng
    for _ in range(num_heldout_scenes):
        objs, anchor = cooccur_scene(rng, rate=0.0)  # the partner is missing: the case the prior gets wrong
        png = render_scene(objs, rng)
        for split in ("random", "popular", "adversarial"):
            if rng.random() < 0.5:
                name, ans = rng.choice(objs).name, "yes"
            else:
                neg = PARTNER[anchor] if split == "adversarial" else absent_object(objs, rng, split)
                name, ans = f"{neg[0]} {neg[1]}", "no"
            h.add("pope", {"task": "pope", "split": split, "answer": ans, "objects": _objects(objs),
                           "anchor": list(anchor), "messages": [_user(_img(), _txt(f"Is there a {name} in the image?"))]},
                  [png])
        h.add("captions", {"task": "caption", "answer": caption(objs), "objects": _objects(objs),
                           "messages": [_user(_img(), _txt("Describe the image.")), _assistant(caption(objs))]}, [png])
        _pair(h, objs, anchor, png)
    counts["heldout"] = h.close()
    meta = {"variant": "cooccur", "version": COOCCUR_VERSION, "seed": seed, "rate": rate, "leak": leak,
            "vqa_from_captions": vqa_from_captions, "counts": counts}
    (out / "demo.json").write_text(json.dumps(meta, indent=2))
    return meta
