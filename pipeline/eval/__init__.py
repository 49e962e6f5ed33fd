"""Evaluation and audit of trained SAEs."""
