"""The bottom layer: errors, the typed config, atomic writes, paths, ranks, signals and the output
lock. Imports nothing from the rest of peftko, and nothing heavy (no torch)."""
