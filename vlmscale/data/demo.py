"""The built-in demo dataset: rendered scenes of coloured shapes.

Every task family the product trains on is represented: captions, multi-turn VQA (colour, shape,
count, position, yes/no object probes), layout questions (objects read left to right, one object left
or right of another), grounding boxes, multi-image comparison, video clips of a
moving object, interleaved documents, text-only QA and preference pairs. Objects co-occur with fixed partners, so POPE's
adversarial negatives (a present object's usual partner, absent) mean something.

Generation is deterministic for a seed and takes seconds; ``ensure_demo`` generates once per
directory under a file lock, so every rank of a launch can call it.
"""

from __future__ import annotations

import fcntl
import io
import json
import logging
import os
import random
import shutil
from pathlib import Path

from PIL import Image, ImageDraw

from vlmscale.data.shards import ShardWriter
from vlmscale.demo_vocab import (
    IMAGE_SIZE,
    COLOURS,
    COLUMNS,
    OBJECTS,
    POPULARITY,
    Obj,
    sample_scene,
    caption,
    absent_object,
    vqa_questions,
    grounding_question,
    text_task,
)

log = logging.getLogger(__name__)

DEMO_VERSION = 9


def render_scene(objs: list[Obj], rng: random.Random) -> bytes:
    shade = rng.randint(225, 255)
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (shade, shade, min(255, shade + rng.randint(-10, 10))))
    draw = ImageDraw.Draw(img)
    for o in objs:
        fill = COLOURS[o.colour]
        x1, y1, x2, y2 = o.box
        if o.shape == "circle":
            draw.ellipse(o.box, fill=fill)
        elif o.shape == "square":
            draw.rectangle((x1, y1, x2 - 1, y2 - 1), fill=fill)
        else:
            draw.polygon([((x1 + x2) / 2, y1), (x2, y2), (x1, y2)], fill=fill)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


# ---------------------------------------------------------------- questions


def spatial_questions(objs: list[Obj], rng: random.Random) -> list[tuple[str, str, str]]:
    """Layout questions (question type, question, answer): reading order and relative position.

    ``order``: name every object from left to right, asked when no two share a column (so the order is
    unambiguous). ``relative``: is one object left or right of another, for a pair in different columns.
    """
    qs: list[tuple[str, str, str]] = []
    if len(objs) > 1 and len({o.col for o in objs}) == len(objs):
        names = ", ".join(o.name for o in sorted(objs, key=lambda o: o.col))
        qs.append(("order", "Name the objects from left to right.", names))
    pairs = [(a, b) for a in objs for b in objs if a.col != b.col]
    if pairs:
        a, b = rng.choice(pairs)
        side = "left" if a.col < b.col else "right"
        qs.append(("relative", f"Is the {a.colour} object to the left or to the right of the {b.colour} object?", side))
    return qs


# ---------------------------------------------------------------- samples


def _user(*parts: dict) -> dict:
    return {"role": "user", "content": list(parts)}


def _assistant(text: str) -> dict:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def _img(name: str = "img0.png") -> dict:
    return {"type": "image", "image": name}


def _txt(text: str) -> dict:
    return {"type": "text", "text": text}


# harder question types (a binding: find the object by one attribute, report another) get more weight;
# shape and count are learned from far fewer examples
QUESTION_WEIGHTS = {"probe": 2.0, "colour": 2.0, "position": 1.5, "shape": 0.5, "count": 0.5}


def _conversation(objs, rng, n_turns: int) -> list[dict]:
    """Question types drawn by weight (then a question of that type), so rarer types are not starved.

    Weights follow :data:`QUESTION_WEIGHTS`.
    """
    by_type: dict[str, list] = {}
    for qtype, q, a in vqa_questions(objs, rng):
        by_type.setdefault(qtype, []).append((qtype, q, a))
    picked = []
    while len(picked) < n_turns and by_type:
        types = sorted(by_type)
        qtype = rng.choices(types, weights=[QUESTION_WEIGHTS[t] for t in types])[0]
        items = by_type[qtype]
        picked.append(items.pop(rng.randrange(len(items))))
        if not items:
            del by_type[qtype]
    msgs = []
    for i, (_, q, a) in enumerate(picked):
        msgs.append(_user(_img(), _txt(q)) if i == 0 else _user(_txt(q)))
        msgs.append(_assistant(a))
    return msgs


class _Gen:
    """Writes one split's shards, a source per task family."""

    def __init__(self, root: Path, split: str, seed: int):
        self.root, self.split = root, split
        self.rng = random.Random(seed)
        self.writers: dict[str, ShardWriter] = {}
        self.counts: dict[str, int] = {}

    def add(self, source: str, record: dict, images: list[bytes] | dict[str, bytes]) -> None:
        if source not in self.writers:
            self.writers[source] = ShardWriter(self.root / self.split / source, max_count=2000)
            self.counts[source] = 0
        key = f"{self.split}-{source}-{self.counts[source]:06d}"
        record = {"id": key, **record}
        members = {"json": json.dumps(record).encode()}
        named = images if isinstance(images, dict) else {f"img{i}.png": data for i, data in enumerate(images)}
        members.update(named)
        self.writers[source].write(key, members)
        self.counts[source] += 1

    def scene(self, min_objects: int = 1):
        objs = sample_scene(self.rng, min_objects=min_objects)
        return objs, render_scene(objs, self.rng)

    def close(self) -> dict[str, int]:
        for w in self.writers.values():
            w.close()
        return dict(self.counts)


def generate_train(root: Path, *, num_scenes: int, seed: int) -> dict[str, int]:
    g = _Gen(root, "train", seed)
    rng = g.rng
    for _ in range(num_scenes):
        objs, png = g.scene()
        g.add("vqa", {"task": "vqa", "messages": _conversation(objs, rng, rng.randint(3, 5))}, [png])
        objs, png = g.scene()
        targets = rng.sample(objs, min(len(objs), 2))
        msgs = []
        for i, o in enumerate(targets):
            q, a = grounding_question(o)
            msgs += [_user(_img(), _txt(q)) if i == 0 else _user(_txt(q)), _assistant(a)]
        g.add("grounding", {"task": "grounding", "messages": msgs}, [png])
        objs, png = g.scene()
        g.add("captions", {"task": "caption", "messages": [_user(_img(), _txt("Describe the image.")), _assistant(caption(objs))]}, [png])
        kind, q, a = text_task(rng)
        g.add("text", {"task": f"text/{kind}", "messages": [_user(_txt(q)), _assistant(a)]}, [])
    for _ in range(num_scenes // 2):
        rec, pngs = _multi_sample(g)
        g.add("multi", rec, pngs)
        rec, pngs = _document(g)
        g.add("docs", rec, pngs)
        rec, pngs = _preference(g)
        g.add("pref", rec, pngs)
    return g.close()


def _multi_sample(g: _Gen):
    rng = g.rng
    (a, pa), (b, pb) = g.scene(), g.scene()
    while len(a) == len(b):
        b, pb = g.scene()
    if rng.random() < 0.5:
        q, ans = "Which image has more objects, the first or the second?", "first" if len(a) > len(b) else "second"
    else:
        colour = rng.choice([o.colour for o in a + b])
        both = any(o.colour == colour for o in a) and any(o.colour == colour for o in b)
        q, ans = f"Do both images contain a {colour} object?", "yes" if both else "no"
    msgs = [_user(_txt("First image: "), _img("img0.png"), _txt("Second image: "), _img("img1.png"), _txt(q)), _assistant(ans)]
    return {"task": "vqa", "qtype": "multi", "answer": ans, "messages": msgs}, [pa, pb]


def _document(g: _Gen):
    rng = g.rng
    parts, pngs = [_txt("A page from a picture book.\n")], []
    for i in range(rng.randint(1, 3)):
        objs, png = g.scene()
        pngs.append(png)
        parts.append(_img(f"img{i}.png"))
        parts.append(_txt(f"Picture {i + 1}. {caption(objs)}\n"))
    return {"task": "document", "document": parts}, pngs


def _preference(g: _Gen):
    rng = g.rng
    objs, png = g.scene()
    neg = absent_object(objs, rng, rng.choice(["random", "popular", "adversarial"]))
    good = caption(objs)
    if neg is None:
        neg = ("red", "circle") if ("red", "circle") not in {(o.colour, o.shape) for o in objs} else ("blue", "square")
    bad_obj = Obj(neg[0], neg[1], rng.randrange(3), rng.randrange(3), (0, 0, 0, 0))
    bad = caption(objs[:-1] + [bad_obj]) if len(objs) > 1 else caption([bad_obj])
    prompt = [_user(_img(), _txt("Describe the image."))]
    return {"task": "preference", "messages": prompt, "chosen": good, "rejected": bad}, [png]


VIDEO_FRAMES = 12


def _video_clip(g: _Gen):
    """A clip of one object crossing the frame left or right; asks which way it moves."""
    rng = g.rng
    colour, shape = rng.choices(OBJECTS, weights=POPULARITY)[0]
    direction = rng.choice(["left", "right"])
    row, size = rng.randrange(3), 12
    y1 = row * (IMAGE_SIZE // 3) + 2
    span = IMAGE_SIZE - size - 4
    background = rng.getrandbits(32)
    frames = []
    for i in range(VIDEO_FRAMES):
        frac = i / (VIDEO_FRAMES - 1)
        x1 = 2 + round(span * (frac if direction == "right" else 1 - frac))
        obj = Obj(colour, shape, row, min(2, (x1 + size // 2) // (IMAGE_SIZE // 3)), (x1, y1, x1 + size, y1 + size))
        frames.append(render_scene([obj], random.Random(background)))
    names = [f"frame{i:02d}.png" for i in range(VIDEO_FRAMES)]
    frames = dict(zip(names, frames))
    q = f"Which way does the {colour} {shape} move, left or right?"
    video = {"type": "video", "frames": names, "fps": 4}
    rec = {"task": "vqa", "qtype": "video", "answer": direction, "messages": [_user(video, _txt(q)), _assistant(direction)]}
    return rec, frames


def generate_video(root: Path, split: str, *, num_clips: int, seed: int) -> dict[str, int]:
    """Video clips, generated apart from the other sources (their own seed) so those stay unchanged."""
    g = _Gen(root, split, seed)
    for _ in range(num_clips):
        rec, frames = _video_clip(g)
        if split == "heldout":
            rec = {**rec, "messages": rec["messages"][:1]}
        g.add("video", rec, frames)
    return g.close()


def scene_text(objs: list[Obj], rng: random.Random) -> str:
    """The objects of a scene named in words, in random order (the corpus's stand-in for an image)."""
    listed = rng.sample(objs, len(objs))
    return "; ".join(f"{o.name} at the {['top', 'centre', 'bottom'][o.row]} {COLUMNS[o.col]}" for o in listed)


def generate_spatial(root: Path, split: str, *, num_scenes: int, seed: int) -> dict[str, int]:
    """Layout questions (:func:`spatial_questions`) on scenes of their own seed, so the other sources stay unchanged.

    Train: conversations of the scene's layout questions (and its column question when there is one);
    held-out: one record per question, ``qtype`` ``order`` or ``relative`` (the ``spatial`` eval suite).
    """
    g = _Gen(root, split, seed)
    rng = g.rng
    for _ in range(num_scenes):
        objs, png = g.scene(min_objects=2)
        qs = spatial_questions(objs, rng)
        if split == "heldout":
            for qtype, q, a in qs:
                g.add("spatial", {"task": "vqa", "qtype": qtype, "answer": a, "messages": [_user(_img(), _txt(q))]}, [png])
            continue
        qs += [item for item in vqa_questions(objs, rng) if item[0] == "position"]
        if not qs:  # every object in one column: nothing to ask about the layout
            continue
        qs = rng.sample(qs, len(qs))
        msgs = []
        for i, (_, q, a) in enumerate(qs):
            msgs += [_user(_img(), _txt(q)) if i == 0 else _user(_txt(q)), _assistant(a)]
        g.add("spatial", {"task": "vqa", "messages": msgs}, [png])
    return g.close()


def generate_corpus(root: Path, split: str, *, num_docs: int, seed: int) -> dict[str, int]:
    """Text-only conversations for warm-starting the demo's from-scratch LLM (``recipes/configs/demo_llm.yaml``).

    Real pipelines start from a pretrained LLM that knows the language and can use what its context holds;
    this corpus gives the demo LLM both: scenes described in words, then captions of them and questions about
    them, so the caption and question language and reading-from-context are learnt from text alone. Projector
    alignment then only has to put what the image shows where the words were.
    """
    g = _Gen(root, split, seed)
    rng = g.rng
    for _ in range(num_docs):
        objs = sample_scene(rng)
        scene = f"Objects: {scene_text(objs, rng)}."
        kind = rng.random()
        if kind < 0.5:
            msgs = [_user(_txt(f"{scene} Describe the image.")), _assistant(caption(objs))]
            g.add("corpus", {"task": "corpus/caption", "messages": msgs}, [])
        elif kind < 0.8:
            _, q, a = rng.choice(vqa_questions(objs, rng))
            g.add("corpus", {"task": "corpus/question", "messages": [_user(_txt(f"{scene} {q}")), _assistant(a)]}, [])
        else:
            kind, q, a = text_task(rng)
            g.add("corpus", {"task": f"corpus/text/{kind}", "messages": [_user(_txt(q)), _assistant(a)]}, [])
    return g.close()


def generate_heldout(root: Path, *, num_scenes: int, seed: int) -> dict[str, int]:
    g = _Gen(root, "heldout", seed)
    rng = g.rng
    for _ in range(num_scenes):
        objs, png = g.scene()
        by_type: dict[str, list] = {}
        for qtype, q, a in vqa_questions(objs, rng):
            if qtype != "probe":
                by_type.setdefault(qtype, []).append((q, a))
        for qtype, items in sorted(by_type.items()):
            q, a = rng.choice(items)
            g.add("vqa", {"task": "vqa", "qtype": qtype, "answer": a, "messages": [_user(_img(), _txt(q))]}, [png])
        o = rng.choice(objs)
        q, a = grounding_question(o)
        g.add("grounding", {"task": "grounding", "answer": a, "messages": [_user(_img(), _txt(q))]}, [png])
        for split in ("random", "popular", "adversarial"):
            if rng.random() < 0.5:
                o = rng.choice(objs)
                name, ans = o.name, "yes"
            else:
                neg = absent_object(objs, rng, split)
                if neg is None:
                    continue
                name, ans = f"{neg[0]} {neg[1]}", "no"
            g.add("pope", {"task": "pope", "split": split, "answer": ans,
                           "messages": [_user(_img(), _txt(f"Is there a {name} in the image?"))]}, [png])
        g.add("captions", {"task": "caption", "answer": caption(objs),
                           "messages": [_user(_img(), _txt("Describe the image.")), _assistant(caption(objs))]}, [png])
        kind, q, a = text_task(rng)
        g.add("text", {"task": f"text/{kind}", "answer": a, "messages": [_user(_txt(q)), _assistant(a)]}, [])
    for _ in range(num_scenes // 2):
        rec, pngs = _multi_sample(g)
        g.add("vqa", {**rec, "messages": rec["messages"][:1]}, pngs)
        rec, pngs = _preference(g)
        g.add("pref", rec, pngs)
    return g.close()


def generate_demo(out: Path, *, num_train_scenes: int = 6000, num_heldout_scenes: int = 200, seed: int = 0) -> dict:
    counts = {
        "train": generate_train(out, num_scenes=num_train_scenes, seed=seed),
        "heldout": generate_heldout(out, num_scenes=num_heldout_scenes, seed=seed + 1),
    }
    counts["train"].update(generate_video(out, "train", num_clips=max(8, num_train_scenes // 10), seed=seed + 2))
    counts["heldout"].update(generate_video(out, "heldout", num_clips=max(8, num_heldout_scenes // 2), seed=seed + 3))
    counts["train"].update(generate_corpus(out, "train", num_docs=num_train_scenes * 2, seed=seed + 4))
    counts["train"].update(generate_spatial(out, "train", num_scenes=num_train_scenes, seed=seed + 5))
    counts["heldout"].update(generate_spatial(out, "heldout", num_scenes=num_heldout_scenes, seed=seed + 6))
    meta = {"version": DEMO_VERSION, "seed": seed, "counts": counts}
    (out / "demo.json").write_text(json.dumps(meta, indent=2))
    return meta


def ensure_demo(out: str | Path, **kwargs) -> Path:
    """Generate the demo dataset into ``out`` unless it is already complete (safe across processes)."""
    out = Path(out)
    marker = out / "demo.json"
    if marker.is_file() and json.loads(marker.read_text()).get("version") == DEMO_VERSION:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.is_file() and json.loads(marker.read_text()).get("version") == DEMO_VERSION:
            return out
        tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        log.info("generating the demo dataset in %s", out)
        generate_demo(tmp, **kwargs)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    return out
