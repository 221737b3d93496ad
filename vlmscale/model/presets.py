"""Built-in model sizes, made from transformers' own InternVL config classes (no download)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Preset:
    image_size: int
    patch_size: int
    vision_hidden: int
    vision_layers: int
    vision_heads: int
    text_hidden: int
    text_layers: int
    text_heads: int
    text_kv_heads: int
    text_intermediate: int
    vocab_size: int
    max_tiles: int
    # 2-D position cue on the image tokens (model.image_pos_scale; 0 = stock InternVL). Off in both presets:
    # 0.05 on the demo was not shown to help (docs/stages.md, issue #20)
    image_pos_scale: float = 0.0

    @property
    def image_seq_length(self) -> int:
        # pixel shuffle with downsample_ratio 0.5 merges 2x2 patches into one token
        return (self.image_size // self.patch_size) ** 2 // 4


PRESETS: dict[str, Preset] = {
    # tests: a training step takes milliseconds
    "tiny": Preset(
        image_size=32, patch_size=8, vision_hidden=32, vision_layers=2, vision_heads=2,
        text_hidden=32, text_layers=2, text_heads=2, text_kv_heads=1, text_intermediate=64,
        vocab_size=512, max_tiles=4,
    ),
    # the built-in demo: learns colour / shape / count / position / boxes on 2 CPU cores in minutes;
    # 48-px tiles of 3x3 image tokens (8-px patches, 2x2 pixel shuffle)
    "demo": Preset(
        image_size=48, patch_size=8, vision_hidden=128, vision_layers=4, vision_heads=4,
        text_hidden=256, text_layers=4, text_heads=4, text_kv_heads=2, text_intermediate=704,
        vocab_size=1024, max_tiles=4,
    ),
}
