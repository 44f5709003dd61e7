"""Test-suite settings: one torch thread (2-core shared machines; the first multi-threaded forward costs seconds)."""

import torch

torch.set_num_threads(1)
