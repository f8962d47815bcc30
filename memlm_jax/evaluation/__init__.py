"""Metrics over arrays and decoded outputs; no gin, no models."""
