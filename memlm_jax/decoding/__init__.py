"""Decoding loops over arrays and callables (no gin)."""
