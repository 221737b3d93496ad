"""Training machinery shared by every stage: the engine step, the loop, checkpoints, metrics, progress, preemption, the watchdog, safe loading, fault injection, FLOPs, launch."""
