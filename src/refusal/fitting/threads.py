"""A fixed CPU thread count for fits, so that an artifact does not depend on who fitted it.

Artifacts are shared by key, and the key cannot know the process's thread count: a joblib worker
(``OMP_NUM_THREADS=1``) and a serial run must produce the same file. Float sums are not
associative, and the thread count changes their order: ATen splits a reduction over more than
``at::internal::GRAIN_SIZE`` (32768) elements into one partial sum per thread (an INLP loss and
intercept gradient over that many rows differ in the last bits, and L-BFGS amplifies that), and MKL
only promises the same BLAS / LAPACK result for the same thread count. A fit therefore runs its
numerics on :data:`FIT_THREADS` intra-op threads and gives the caller's count back afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

#: Intra-op CPU threads every fit runs on. One: the fits are small (an INLP fit at the qwen05 study
#: size is no slower on one thread), and one is a count that every machine and worker can give.
FIT_THREADS = 1


@contextmanager
def fixed_threads(n: int = FIT_THREADS) -> Iterator[None]:
    """Run the block on ``n`` torch intra-op threads, then restore the caller's count (also on error)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
