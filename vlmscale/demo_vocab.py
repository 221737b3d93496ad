"""The demo's scenes and the text they are described in: objects, captions, questions, text
tasks, and the corpus the preset tokenizers are trained on. Pure Python, no imports from
the package, so both ``vlmscale.data.demo`` (which draws the images) and
``vlmscale.model.build`` (which trains the preset tokenizers) can use it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


# 48-px scenes on a 3x3 grid of 16-px cells: with 8-px patches and InternVL's 2x2 pixel shuffle
# each cell is exactly one image token, so an object's colour and shape meet in one token.
IMAGE_SIZE = 48
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 230),
    "yellow": (235, 205, 30),
    "purple": (150, 60, 190),
    "orange": (245, 135, 25),
}
SHAPES = ("circle", "square", "triangle")
COLUMNS = ("left", "middle", "right")
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
OBJECTS = [(c, s) for c in COLOURS for s in SHAPES]
# popularity: a few objects appear far more often (POPE "popular" negatives)
POPULARITY = [6.0 if i % 5 == 0 else 1.0 for i in range(len(OBJECTS))]
# each object's usual companion (POPE "adversarial" negatives)
PARTNER = {OBJECTS[i]: OBJECTS[(i * 7 + 4) % len(OBJECTS)] for i in range(len(OBJECTS))}
WORDS = ["cat", "dog", "sun", "tree", "book", "river", "apple", "stone", "cloud", "green", "paper", "music",
         "table", "light", "water", "house", "bread", "chair", "plant", "bird", "snow", "road", "glass", "field"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


@dataclass
class Obj:
    colour: str
    shape: str
    row: int
    col: int
    box: tuple[int, int, int, int]  # pixels x1, y1, x2, y2

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


def sample_scene(rng: random.Random, *, min_objects: int = 1) -> list[Obj]:
    n = rng.choice([k for k in (1, 2, 3, 4) if k >= min_objects])
    chosen: list[tuple[str, str]] = []
    while len(chosen) < n:
        if chosen and rng.random() < 0.6:
            cand = PARTNER[rng.choice(chosen)]
        else:
            cand = rng.choices(OBJECTS, weights=POPULARITY)[0]
        if all(cand[0] != c for c, _ in chosen):  # colours are unique within a scene
            chosen.append(cand)
    return place_objects(chosen, rng)


def place_objects(chosen: list[tuple[str, str]], rng: random.Random) -> list[Obj]:
    """``chosen`` (colour, shape) pairs in distinct cells of the 3 x 3 grid, each a 10-14 px square at a
    random offset inside its cell."""
    cells = rng.sample([(r, c) for r in range(3) for c in range(3)], len(chosen))
    cell = IMAGE_SIZE // 3
    objs = []
    for (colour, shape), (row, col) in zip(chosen, cells):
        size = rng.randint(10, 14)
        x1 = col * cell + rng.randint(1, cell - size - 1)
        y1 = row * cell + rng.randint(1, cell - size - 1)
        objs.append(Obj(colour, shape, row, col, (x1, y1, x1 + size, y1 + size)))
    return objs


def box_text(box: tuple[int, int, int, int]) -> str:
    """Normalised 0-999 integer coordinates, InternVL style."""
    coords = [min(999, max(0, round(v * 1000 / IMAGE_SIZE))) for v in box]
    return f"<box>[{coords[0]}, {coords[1]}, {coords[2]}, {coords[3]}]</box>"


def caption(objs: list[Obj]) -> str:
    parts = []
    for o in sorted(objs, key=lambda o: (o.row, o.col)):
        where = {0: "top", 1: "centre", 2: "bottom"}[o.row] + " " + COLUMNS[o.col]
        article = "an" if o.colour[0] in "aeiou" else "a"
        parts.append(f"{article} {o.name} at the {where}")
    count = NUMBER_WORDS[len(objs)]
    noun = "object" if len(objs) == 1 else "objects"
    return f"{count.capitalize()} {noun}: " + ", ".join(parts) + "."


def _unique_shape_objs(objs: list[Obj]) -> list[Obj]:
    return [o for o in objs if sum(p.shape == o.shape for p in objs) == 1]


def _alone_in_column(objs: list[Obj]) -> list[Obj]:
    return [o for o in objs if sum(p.col == o.col for p in objs) == 1]


def absent_object(objs: list[Obj], rng: random.Random, kind: str) -> tuple[str, str] | None:
    present = {(o.colour, o.shape) for o in objs}
    absent = [ob for ob in OBJECTS if ob not in present]
    if kind == "adversarial":
        cands = [PARTNER[p] for p in sorted(present) if PARTNER[p] not in present]  # sorted: independent of PYTHONHASHSEED
        return rng.choice(cands) if cands else None
    if kind == "popular":
        ranked = sorted(absent, key=lambda ob: -POPULARITY[OBJECTS.index(ob)])
        top = [ob for ob in ranked if POPULARITY[OBJECTS.index(ob)] == POPULARITY[OBJECTS.index(ranked[0])]]
        return rng.choice(top)
    return rng.choice(absent)


def vqa_questions(objs: list[Obj], rng: random.Random) -> list[tuple[str, str, str]]:
    """(question type, question, answer) candidates for a scene."""
    qs: list[tuple[str, str, str]] = []
    for o in _unique_shape_objs(objs):
        qs.append(("colour", f"What colour is the {o.shape}?", o.colour))
    for o in objs:
        qs.append(("shape", f"What shape is the {o.colour} object?", o.shape))
    qs.append(("count", "How many objects are there?", str(len(objs))))
    for o in _alone_in_column(objs):  # colours are unique in a scene, so the colour names the object
        qs.append(("position", f"Is the {o.colour} object on the left, in the middle or on the right?", COLUMNS[o.col]))
    o = rng.choice(objs)
    qs.append(("probe", f"Is there a {o.name} in the image?", "yes"))
    neg = absent_object(objs, rng, rng.choice(["random", "popular", "adversarial"]))
    if neg is not None:
        qs.append(("probe", f"Is there a {neg[0]} {neg[1]} in the image?", "no"))
    return qs


def grounding_question(o: Obj) -> tuple[str, str]:
    return f"Where is the {o.name}? Answer with a bounding box.", box_text(o.box)


def text_task(rng: random.Random) -> tuple[str, str, str]:
    kind = rng.choice(["add", "sub", "max", "reverse", "length", "day"])
    if kind == "add":
        a, b = rng.randint(0, 50), rng.randint(0, 50)
        return kind, f"What is {a} plus {b}?", str(a + b)
    if kind == "sub":
        a = rng.randint(0, 60)
        b = rng.randint(0, a)
        return kind, f"What is {a} minus {b}?", str(a - b)
    if kind == "max":
        a, b = rng.sample(range(100), 2)
        return kind, f"Which number is larger, {a} or {b}?", str(max(a, b))
    if kind == "reverse":
        w = rng.choice(WORDS)
        return kind, f"Write the word '{w}' backwards.", w[::-1]
    if kind == "length":
        w = rng.choice(WORDS)
        return kind, f"How many letters are in the word '{w}'?", str(len(w))
    i = rng.randrange(7)
    return kind, f"Which day comes after {DAYS[i]}?", DAYS[(i + 1) % 7]


def tokenizer_corpus() -> list[str]:
    """Text the preset tokenizers are trained on: demo-like text plus generic English."""
    rng = random.Random(12345)
    lines = []
    for _ in range(600):
        objs = sample_scene(rng)
        lines.append(caption(objs))
        for _, q, a in vqa_questions(objs, rng):
            lines.append(f"{q}\n{a}")
        for o in objs:
            q, a = grounding_question(o)
            lines.append(f"{q}\n{a}")
        _, q, a = text_task(rng)
        lines.append(f"{q}\n{a}")
    lines += [
        "A page from a picture book. Picture 1. First image: Second image: Which image has more objects, "
        "the first or the second? Do both images contain a red object? user assistant system",
        "The quick brown fox jumps over the lazy dog. Hello, world! This is a simple sentence about images, "
        "questions and answers. What is in this picture? Please describe it in detail.",
    ] + [" ".join(WORDS), " ".join(DAYS), " ".join(str(i) for i in range(1000))]
    return lines
