"""Run one function over many jobs in worker processes, in input order, with a progress bar.

`vidlora check` (decoding every sample) and `vidlora cache` (filling the frame cache) share it.
"""

from __future__ import annotations

import multiprocessing
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import TypeVar

import torch
from tqdm import tqdm

Job = TypeVar("Job")
Result = TypeVar("Result")


def _single_threaded() -> None:
    torch.set_num_threads(1)


def map_in_processes(
    function: Callable[[Job], Result],
    jobs: Sequence[Job],
    workers: int,
    *,
    desc: str,
    unit: str = "job",
    progress: bool = True,
) -> list[Result]:
    """``[function(job) for job in jobs]``, in ``workers`` processes when ``workers > 1``.

    ``function`` and the jobs must pickle (a module-level function, dataclass jobs).
    """
    bar = tqdm(total=len(jobs), desc=desc, unit=unit, disable=not progress, file=sys.stderr)
    with bar:
        results: list[Result] = []
        if workers <= 1:
            for job in jobs:
                results.append(function(job))
                bar.update(1)
            return results
        # Forked workers start in milliseconds (spawn re-imports torch and transformers in each).
        # A forked child must not use the OpenMP pool the parent already started (it hangs), so
        # each worker runs torch single-threaded, as torch's own DataLoader workers do.
        context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
        with ProcessPoolExecutor(
            max_workers=workers, mp_context=context, initializer=_single_threaded
        ) as pool:
            # map keeps input order; chunks amortise the inter-process round trips.
            chunksize = max(1, min(16, len(jobs) // (4 * workers)))
            for result in pool.map(function, jobs, chunksize=chunksize):
                results.append(result)
                bar.update(1)
        return results
