"""Flax NNX building blocks shared by the models."""
