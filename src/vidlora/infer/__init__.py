"""Inference: generation, chat, predict, merge."""
