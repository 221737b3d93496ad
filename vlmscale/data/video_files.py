"""Video files (mp4/avi/mkv/webm/mov) -> sampled JPEG frames with timestamps, at conversion time.

Decoding uses PyAV (the optional ``video`` extra: ``pip install 'vlmscale[video]'``). Frames are
sampled uniformly (``num_frames``, the centre of each of n equal segments of the clip) or at a fixed
rate (``fps``), and stored as JPEG members that the renderer's video path reads like any frame list.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".webm", ".mov")


class MissingExtra(ValueError):
    """An optional dependency a record needs is not installed (stops the conversion, not a skip)."""


class UnreadableVideo(Exception):
    """The file could not be decoded (the converter counts it as ``unreadable_video``)."""


@dataclass(frozen=True)
class FrameSampling:
    num_frames: int = 8  # uniform: this many frames over the whole clip
    fps: float | None = None  # instead: one frame every 1/fps seconds

    def targets(self, duration: float) -> list[float]:
        if self.fps is not None:
            n = max(1, int(duration * self.fps))
            return [k / self.fps for k in range(n)]
        return [(k + 0.5) * duration / self.num_frames for k in range(self.num_frames)]


def is_video_file(name: str) -> bool:
    return Path(name).suffix.lower() in VIDEO_SUFFIXES


def decode_video(source: str | Path | bytes, sampling: FrameSampling, *, quality: int = 90) -> list[tuple[bytes, float]]:
    """``[(jpeg bytes, seconds)]`` of the sampled frames, in time order."""
    try:
        import av
    except ImportError as exc:
        raise MissingExtra("decoding video files needs PyAV: pip install 'vlmscale[video]' (or pre-extract the frames)") from exc
    try:
        with av.open(io.BytesIO(source) if isinstance(source, bytes) else str(source)) as container:
            stream = container.streams.video[0]
            if stream.duration is not None and stream.time_base is not None:
                duration = float(stream.duration * stream.time_base)
            elif container.duration is not None:
                duration = container.duration / 1e6
            else:
                duration = 0.0
            decoded = [(float(f.time or 0.0), f) for f in container.decode(stream)] if duration <= 0 else None
            if decoded is not None:  # no duration in the header: decode all once, then sample
                duration = decoded[-1][0] + 1e-6 if decoded else 0.0
                frames = iter(decoded)
            else:
                frames = ((float(f.time or 0.0), f) for f in container.decode(stream))
            targets = sampling.targets(duration)
            out: list[tuple[bytes, float]] = []
            last = None
            for t, frame in frames:
                while len(out) < len(targets) and t >= targets[len(out)] - 1e-6:
                    out.append((_jpeg(frame.to_image(), quality), t))
                last = (t, frame)
                if len(out) == len(targets):
                    break
            if not out and last is not None:
                out.append((_jpeg(last[1].to_image(), quality), last[0]))
    except (av.error.FFmpegError, IndexError, OSError, ValueError) as exc:
        raise UnreadableVideo(str(exc) or type(exc).__name__) from exc
    if not out:
        raise UnreadableVideo("no frames decoded")
    return out


def _jpeg(image, quality: int) -> bytes:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()
