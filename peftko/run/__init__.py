"""A training run's output folder: its names, the records a run and a merge write (peftko.run.records),
fingerprints, checkpoints, what --resume may continue, ownership, the final write, the model card and
report.png. Uses peftko.core only."""
