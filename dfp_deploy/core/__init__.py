"""Shared vocabulary of the stages: frozen artifacts, the error tree, small helpers."""
