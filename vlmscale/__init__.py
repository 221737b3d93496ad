"""vlmscale: train InternVL-style vision-language models with DeepSpeed ZeRO-3."""

__version__ = "0.1.0"
