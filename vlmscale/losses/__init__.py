"""Losses as pure tensor functions (preference pairs, PPO), unit-tested by hand."""
