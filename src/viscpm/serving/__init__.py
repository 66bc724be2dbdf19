"""Serving VisCPM: an OpenAI-compatible HTTP API."""
