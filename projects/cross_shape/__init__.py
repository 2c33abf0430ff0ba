"""Attention transfer across shapes: a teacher of another depth, head count or token grid (README.md)."""
