"""Compression on nn.Modules, split by job: select (which channels), prune, repair, quantize, calibrate."""
