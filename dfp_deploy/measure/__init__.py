"""Measurement: latency protocol, parity and accuracy on an evaluation dataset."""
