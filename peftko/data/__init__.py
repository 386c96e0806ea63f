"""The tokenised corpus: whole documents tokenised, split, packed into blocks and cached (packing.py), and
batched with masks that keep packed documents apart (collate.py). Runs before any model is built."""
