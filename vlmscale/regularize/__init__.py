"""Regularizers applied during training (EWC, partition-local under ZeRO-3)."""
