"""Work that waits until the command has answered: the figures of the runs it recorded.

Rendering a fit's five figures is most of a small fit's recording (over a second here), and a
user waits for the estimates, not the PNGs. Where the CLI says so (`start`), the recorder ends a
run without its figures, tagged as pending, and queues them here; the CLI renders and logs them
once it has printed its answer (the warm runner's child once the command has its exit status; a
command in its own process forks a child for them and exits).
A process that is killed first leaves the runs tagged: the figures are late, never silently
dropped. Without it (the API, a Prefect worker, a Dask worker) figures are logged at once.
"""

from __future__ import annotations

import threading
from typing import Callable

_queue: list[Callable[[], None]] | None = None
_lock = threading.Lock()


def start() -> None:
    """Defer from now on in this process, until `run_deferred`."""
    global _queue
    with _lock:
        if _queue is None:
            _queue = []


def deferring() -> bool:
    return _queue is not None


def pending() -> bool:
    """Whether jobs wait for `run_deferred`."""
    return bool(_queue)


def later(job: Callable[[], None]) -> None:
    """Queue `job` for `run_deferred`; run it now when nothing defers (any more)."""
    with _lock:
        if _queue is not None:
            _queue.append(job)
            return
    job()


def run_deferred() -> list[str]:
    """Run the queued jobs in order and stop deferring; one line per job that failed (the others
    still run)."""
    global _queue
    with _lock:
        jobs, _queue = _queue or [], None
    failures = []
    for job in jobs:
        try:
            job()
        except Exception as error:
            failures.append(f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0]}")
    return failures
