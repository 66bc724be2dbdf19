"""Experiments reproducing the paper's claims at toy scale (needs the experiment extra)."""
