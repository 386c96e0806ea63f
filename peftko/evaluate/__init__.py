"""Measuring a model: held-out bits per character, `peftko eval`'s scores, ablate's structure score.
Uses the layers below it (model and lower)."""
