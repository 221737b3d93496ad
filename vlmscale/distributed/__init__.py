"""The process group, device-aware collectives, the launcher's environment, ZeRO-3 helpers."""
