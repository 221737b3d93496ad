"""Values the model and the data agree on: the label ignore index and the special tokens."""

from __future__ import annotations


IGNORE = -100


PAD, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
IMG_START, IMG_END, IMG_CONTEXT, VIDEO = "<img>", "</img>", "<IMG_CONTEXT>", "<video>"
SPECIAL_TOKENS = [PAD, IM_START, IM_END, IMG_START, IMG_END, IMG_CONTEXT, VIDEO]
