"""Losses that are more than a line."""
