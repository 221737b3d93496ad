"""Training objectives as pure tensor functions (no DeepSpeed, no model code)."""
