"""Measuring a model: held-out bits per character, `peftko eval`'s scores, ablate's structure score,
`peftko bench`'s lm-eval tasks.
Uses the layers below it (model and lower)."""
