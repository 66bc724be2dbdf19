"""viscpm in evaluation harnesses: VisCPM-Chat as an lmms-eval model, and the mpm-mini items as an lmms-eval task
(docs/evaluation.md). Needs the `eval` extra."""
