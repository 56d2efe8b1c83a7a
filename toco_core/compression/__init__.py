"""Compression operators: pure functions on (model, tolerances, scale, options)."""
