"""Choosing channels: importance rankings, kept counts, lmmse selection and allocation, measured statistics."""
