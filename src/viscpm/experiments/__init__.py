"""Experiments reproducing the paper's claims at toy scale (needs the train and experiment extras)."""
