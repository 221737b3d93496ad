"""Everything DeepSpeed: process groups, ZeRO-3 scoping, the engine and step, checkpoints, export."""
