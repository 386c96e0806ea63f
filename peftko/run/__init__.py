"""A training run's output folder: its names, the manifest, fingerprints, checkpoints, what --resume
may continue, ownership, the final write, the model card and report.png. Uses peftko.core only."""
