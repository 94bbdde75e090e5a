"""Evaluation: scoring and reports."""
