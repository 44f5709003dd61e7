"""Thread control for the small-matrix math of planning and reconstruction.

Selection and closed-form reconstruction run thousands of tiny (≤ a few hundred wide) linear-algebra ops. Torch
parallelises each one over its intra-op threads, which gains nothing at that size and, on a machine whose cores are
busy with other jobs, costs a lot: every op waits for its slowest thread to be scheduled. Measured on a 2-core box
with a load average of 6: choosing a ResNet-20 lmmse plan took 18 s with 2 threads and 0.7 s with 1.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def torch_threads(count: int = 1) -> Iterator[None]:
    """Run the body with `count` torch intra-op threads, restoring the previous setting afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
