"""One way to spread the toy world's per-image work (rendering, checking, features) over processes.

With one worker the work runs in this process. With more, the workers are spawned, not forked: a
process forked from one that has run torch (its OpenMP thread pool, as the pipeline and train.py do
before the toy metric runs) can deadlock in the child, and the pool then waits forever.
"""

import multiprocessing
from collections.abc import Callable, Iterable, Iterator


def ordered_map(fn: Callable, items: Iterable, workers: int, chunksize: int = 64) -> Iterator:
    """fn over items, results in the items' order."""
    if workers <= 1:
        yield from map(fn, items)
        return
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        yield from pool.imap(fn, items, chunksize=chunksize)
