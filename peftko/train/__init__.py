"""One lora-train run: the session, the Trainer, data packing and collation, logging, and the
guards (signals, non-finite steps, out-of-memory, disk space). Uses the layers below it."""
