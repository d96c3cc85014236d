"""Which files a flow run started through a deployment may read: its data paths come from whoever
can start flow runs, so a worker reads only below the directories its own configuration allows.

`NLLFLOW_DATA_DIRS` (directories separated by `os.pathsep`, set in the worker's environment) is the
allow-list; unset, it is the worker's working directory and nllflow's home. A path is resolved
before it is checked (`..` and symbolic links are followed), so neither leads out of the list. The
CLI and the Python API read what their user names: the list applies to deployment runs only.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from nllflow.errors import InputError

DATA_DIRS_VARIABLE = "NLLFLOW_DATA_DIRS"


def allowed_directories() -> list[Path]:
    """The allow-list: $NLLFLOW_DATA_DIRS, else the working directory and nllflow's home."""
    from nllflow.tracking.store import nllflow_home

    configured = [entry for entry in os.environ.get(DATA_DIRS_VARIABLE, "").split(os.pathsep) if entry.strip()]
    directories = [Path(entry).expanduser() for entry in configured] or [Path.cwd(), nllflow_home()]
    return [directory.resolve() for directory in directories]


def check_readable(paths: Iterable[str | None], where: str = "a deployment run's data") -> None:
    """Refuse, in one line, any path that resolves outside the allow-list."""
    directories = allowed_directories()
    for path in filter(None, paths):
        resolved = Path(path).expanduser().resolve()
        if not any(resolved == directory or directory in resolved.parents for directory in directories):
            shown = os.pathsep.join(map(str, directories))
            raise InputError(
                f"{where} may be read only below {shown} ({DATA_DIRS_VARIABLE} on the worker sets the list): "
                f"{path!r} resolves to {resolved}"
            )
