"""The model: loading a base, tiny demo bases, markers as tokens, LoRA, fast kernels and the fused
loss, the memory plan, and loading a result back for use. Uses core, corpus and run."""
