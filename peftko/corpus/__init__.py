"""Reading a corpus: encodings, documents, the marker lint, the corpus report, and the one reader
that lora-train, eval and ablate share. Uses only peftko.core."""
