"""Evaluation suites: VQA exact match, grounding IoU, POPE probing."""
