"""Merging an adapter into its base: the output folder, the streaming merge, the in-memory merge and
logit check, the model's config files, and GGUF export. Uses the layers below it."""
