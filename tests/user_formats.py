"""Small datasets in users' formats (ShareGPT, OpenAI content lists, InternVL meta, HF parquet, video
files) and the bad images the decoding must survive, made in code for the unit and distributed tests."""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

RED, BLUE = (220, 20, 20), (20, 20, 220)


def png(color=(0, 160, 0), size=(40, 40), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG")
    return buf.getvalue()


def jpeg(img: Image.Image, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", **kwargs)
    return buf.getvalue()


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth photo-like RGB image (gradients plus noise), so JPEG sizes are realistic."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([x / width * 255, y / height * 255, (x + y) / (width + height) * 255], -1)
    noise = rng.normal(0, 12, (height // 8 + 1, width // 8 + 1, 3)).repeat(8, 0).repeat(8, 1)[:height, :width]
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def bomb_png(width: int = 200_000, height: int = 200_000) -> bytes:
    """A tiny file whose header claims width x height pixels (far past PIL's decompression-bomb limit)."""
    data = bytearray(png(0, size=(1, 1), mode="L"))
    ihdr = data.index(b"IHDR")
    data[ihdr + 4: ihdr + 12] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr: ihdr + 17])) & 0xFFFFFFFF
    data[ihdr + 17: ihdr + 21] = struct.pack(">I", crc)
    return bytes(data)


def exif_rotated_jpeg() -> bytes:
    """Stored 64x32, left half red and right half blue, EXIF orientation 6 (display rotated 90 degrees
    clockwise): upright it is 32x64 with red on top."""
    img = Image.new("RGB", (64, 32), BLUE)
    img.paste(RED, (0, 0, 32, 32))
    exif = Image.Exif()
    exif[0x0112] = 6
    return jpeg(img, exif=exif, quality=95)


def bad_images() -> dict[str, bytes]:
    """Name -> bytes of each decoding hazard (the sample that holds it is trained on or counted)."""
    cmyk = jpeg(Image.new("CMYK", (40, 40), (0, 255, 255, 0)))  # red in CMYK
    grey16 = io.BytesIO()
    Image.fromarray(np.full((40, 40), 40000, dtype=np.uint16)).save(grey16, format="PNG")
    palette = Image.new("P", (40, 40), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.paste(1, (0, 0, 20, 40))
    pal = io.BytesIO()
    palette.save(pal, format="PNG", transparency=0)  # right half transparent
    gif = io.BytesIO()
    frames = [Image.new("RGB", (40, 40), RED), Image.new("RGB", (40, 40), BLUE)]
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    whole = jpeg(photo(96, 64))
    return {"bomb.png": bomb_png(), "truncated.jpg": whole[: len(whole) // 2], "cmyk.jpg": cmyk,
            "grey16.png": grey16.getvalue(), "palette.png": pal.getvalue(), "animated.gif": gif.getvalue(),
            "exif.jpg": exif_rotated_jpeg()}


def write_video(path: Path, *, frames: int = 12, fps: int = 6, size: int = 32) -> None:
    """An mp4 (or any container PyAV picks by suffix) of a red square moving left to right."""
    import av

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(frames):
            arr = np.zeros((size, size, 3), dtype=np.uint8)
            x = i * (size - 8) // max(frames - 1, 1)
            arr[12:20, x: x + 8] = RED
            for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _ask(question: str, answer: str, *, prefix: str = "") -> list[dict]:
    return [{"role": "user", "content": prefix + question}, {"role": "assistant", "content": answer}]


def sharegpt_file(root: Path, *, n: int = 12, video: bool = False) -> Path:
    """LLaMA-Factory ShareGPT JSONL (with a blank line): single- and multi-image samples, a system
    field, a from/value sample, a missing image, and (``video``) an mp4 sample plus an unreadable one."""
    media = root / "media"
    media.mkdir(parents=True, exist_ok=True)
    for i, color in enumerate([RED, BLUE, (0, 160, 0)]):
        (media / f"c{i}.png").write_bytes(png(color))
    lines = []
    for i in range(n):
        colour = ["red", "blue", "green"][i % 3]
        lines.append({"id": f"sg{i}", "system": "Answer briefly.", "images": [f"c{i % 3}.png"],
                      "messages": _ask("What colour is the square?", colour, prefix="<image>\n")})
    lines.append({"id": "sg-multi", "images": ["c0.png", "c1.png", "c2.png"],
                  "messages": _ask("Colours, in order?", "red, blue, green", prefix="<image><image><image>\n")})
    lines.append({"id": "sg-fromvalue", "images": ["c1.png"], "conversations": [
        {"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "blue"}]})
    lines.append({"id": "sg-missing", "images": ["nope.png"], "messages": _ask("Colour?", "red", prefix="<image>")})
    if video:
        write_video(media / "clip.mp4")
        (media / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not really a video")
        lines.append({"id": "sg-video", "videos": ["clip.mp4"],
                      "messages": _ask("Which way does the red square move?", "right", prefix="<video>\n")})
        lines.append({"id": "sg-badvideo", "videos": ["broken.mp4"], "messages": _ask("Q", "A", prefix="<video>")})
    text = "\n".join(json.dumps(x) for x in lines[:3]) + "\n\n" + "\n".join(json.dumps(x) for x in lines[3:]) + "\n"
    path = root / "sharegpt.jsonl"
    path.write_text(text)
    return path


def openai_file(root: Path, *, n: int = 10) -> Path:
    """OpenAI / TRL content lists as one JSON array: image_url {url}, image paths, a data URL, TRL's bare
    image parts with a top-level images list, a text-only sample, and an http URL (counted skip)."""
    media = root / "media"
    media.mkdir(parents=True, exist_ok=True)
    (media / "blue.png").write_bytes(png(BLUE))
    data_url = "data:image/png;base64," + base64.b64encode(png(RED)).decode()
    records = []
    for i in range(n):
        part = [{"type": "image_url", "image_url": {"url": "blue.png"}}, {"type": "image", "image": data_url},
                {"type": "image", "path": "blue.png"}][i % 3]
        answer = ["blue", "red", "blue"][i % 3]
        records.append({"id": f"oa{i}", "messages": [
            {"role": "user", "content": [part, {"type": "text", "text": "What colour?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]}]})
    records.append({"id": "oa-trl", "images": ["blue.png", "blue.png"], "messages": [
        {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Same colour?"}]},
        {"role": "assistant", "content": "yes"}]})
    records.append({"id": "oa-text", "messages": [{"role": "user", "content": "Say hi."},
                                                   {"role": "assistant", "content": "hi"}]})
    records.append({"id": "oa-remote", "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://example.com/x.png"}}]},
        {"role": "assistant", "content": "?"}]})
    path = root / "openai.json"
    path.write_text(json.dumps(records, indent=1))
    return path


def internvl_meta(root: Path, *, n: int = 8) -> Path:
    """An InternVL meta file with two annotation JSONLs (LLaVA-style records with ``image``)."""
    media = root / "ivl_images"
    media.mkdir(parents=True, exist_ok=True)
    (media / "r.png").write_bytes(png(RED, size=(192, 48)))
    for name in ("a", "b"):
        with open(root / f"ivl_{name}.jsonl", "w") as f:
            for i in range(n):
                f.write(json.dumps({"id": f"{name}{i}", "image": "r.png", "conversations": [
                    {"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"}]}) + "\n")
    meta = {"ivl_a": {"root": str(media), "annotation": str(root / "ivl_a.jsonl"), "repeat_time": 1, "length": n,
                      "max_dynamic_patch": 2},
            "ivl_b": {"root": str(media), "annotation": "ivl_b.jsonl", "repeat_time": 0.5, "length": n}}
    path = root / "meta.json"
    path.write_text(json.dumps(meta))
    return path


def hf_parquet(root: Path, *, n: int = 8) -> Path:
    """A parquet dataset with embedded images (``messages`` + ``images``), through the datasets library."""
    import datasets

    rows = {"messages": [], "images": []}
    for i in range(n):
        colour, rgb = [("red", RED), ("blue", BLUE)][i % 2]
        rows["messages"].append([{"role": "user", "content": "<image>What colour?"}, {"role": "assistant", "content": colour}])
        rows["images"].append([Image.new("RGB", (40, 40), rgb)])
    ds = datasets.Dataset.from_dict(rows, features=datasets.Features({
        "messages": [{"role": datasets.Value("string"), "content": datasets.Value("string")}],
        "images": datasets.Sequence(datasets.Image())}))
    out = root / "hf"
    out.mkdir(parents=True, exist_ok=True)
    ds.to_parquet(str(out / "train-00000.parquet"))
    return out


def bad_input_file(root: Path, *, n_good: int = 6) -> Path:
    """ShareGPT JSONL: one sample per decoding hazard, a 3-image sample of large photos, and good ones."""
    media = root / "bad_media"
    media.mkdir(parents=True, exist_ok=True)
    lines = []
    for name, data in bad_images().items():
        (media / name).write_bytes(data)
        lines.append({"id": f"bad-{name.split('.')[0]}", "images": [name],
                      "messages": _ask("What is shown?", "a picture", prefix="<image>\n")})
    for k in range(3):
        (media / f"large{k}.jpg").write_bytes(jpeg(photo(1600 + 400 * k, 1200, seed=k), quality=85))
    lines.append({"id": "bad-large3", "images": [f"large{k}.jpg" for k in range(3)],
                  "messages": _ask("Describe the three photos.", "gradients", prefix="<image><image><image>\n")})
    (media / "ok.png").write_bytes(png())
    for i in range(n_good):
        lines.append({"id": f"good{i}", "images": ["ok.png"], "messages": _ask("Colour?", "green", prefix="<image>\n")})
    path = root / "bad.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return path
