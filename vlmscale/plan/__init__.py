"""`vlmscale plan`: per-GPU memory of a training run before it is queued (docs/plan.md)."""
