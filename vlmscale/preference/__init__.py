"""Preference alignment: pair losses, the reward and DPO objectives, the DPO reference cache."""
