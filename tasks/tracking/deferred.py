"""Work that waits until the command has answered: the figures of the runs it recorded.

Rendering a fit's five figures is most of a small fit's recording (over a second here), and a
user waits for the estimates, not the PNGs. Where the CLI says so (`start`), the recorder ends a
run without its figures, tagged as pending, and queues them here; the CLI renders and logs them
once it has printed its answer (the warm runner's child once the command has its exit status; a
command in its own process forks a child for them and exits).
While jobs wait or run, the process (and a child it forks for them) holds a shared lock on the
file that `start`'s argument names: `nllflow server stop` waits for it before it ends the warm runner's
children with the server. A process that is killed first leaves the runs tagged: the figures are
late, never silently dropped. Without it (the API, a Prefect worker, a Dask worker) figures are
logged at once.
"""

from __future__ import annotations

import fcntl
import threading
from pathlib import Path
from typing import IO, Callable

_queue: list[Callable[[], None]] | None = None
_lock = threading.Lock()
_owed: Callable[[], Path] | None = None  # the lock file that says figures are owed
_held: IO | None = None  # its handle, shared-locked from the first queued job until they have run


def start(owed: Callable[[], Path] | None = None) -> None:
    """Defer from now on in this process, until `run_deferred`; from the first job queued until
    they have run, hold a shared lock on the file `owed()` names (a fork's child holds it with the
    process). Called once the first job is queued: a command that records nothing never works out
    where it is."""
    global _queue, _owed
    with _lock:
        if _queue is None:
            _queue, _owed = [], owed


def deferring() -> bool:
    return _queue is not None


def pending() -> bool:
    """Whether jobs wait for `run_deferred`."""
    return bool(_queue)


def later(job: Callable[[], None]) -> None:
    """Queue `job` for `run_deferred`; run it now when nothing defers (any more)."""
    global _held
    with _lock:
        if _queue is not None:
            if _owed is not None and _held is None:
                path = _owed()
                path.parent.mkdir(parents=True, exist_ok=True)
                _held = open(path, "a")
                fcntl.flock(_held, fcntl.LOCK_SH)
            _queue.append(job)
            return
    job()


def run_deferred() -> list[str]:
    """Run the queued jobs in order and stop deferring; one line per job that failed (the others
    still run)."""
    global _queue, _held
    with _lock:
        jobs, _queue = _queue or [], None
    failures = []
    try:
        for job in jobs:
            try:
                job()
            except Exception as error:
                failures.append(f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0]}")
    finally:
        with _lock:
            held, _held = _held, None
        if held is not None:
            held.close()
    return failures
