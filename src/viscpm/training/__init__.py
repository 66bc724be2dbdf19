"""MpM training: data preparation, the chat and paint stages, LoRA merging (needs the `train` extra)."""
