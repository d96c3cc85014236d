"""What killed processes leave behind, closed once per process when a top-level flow starts.

A process killed with SIGKILL (the OOM killer, `kill -9`, a lost machine) cannot close what it
started: its Prefect flow run stays Running and a sweep's MLflow parent run stays RUNNING. So every
flow tags its own flow run with the host and process that run it, and the first top-level flow of a
process (not each child of a fan-out) marks Crashed the Running flow runs of this host whose process
no longer exists, and KILLED the MLflow runs left RUNNING by such processes
(`Tracker.close_abandoned_runs`, through `prefect_tasks.prepare_tracking`). A worker does the
Prefect half itself for the flow runs it started; this covers the `nllflow` command and
`flow.serve()`, where no worker watches the process.
"""

from __future__ import annotations

import os
import socket
import threading

from prefect import get_client, get_run_logger, runtime
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType, FlowRunFilterTags
from prefect.client.schemas.objects import StateType
from prefect.context import FlowRunContext
from prefect.states import Crashed

from nllflow.pipeline import prefect_tasks as steps
from nllflow.tracking.store import HOST_TAG, PID_TAG, process_exists

_recovered = threading.Event()


def recover_abandoned_runs(top_level: bool = True) -> None:
    """Claim this flow run for this process; for the first top-level flow of the process, crash the
    flow runs of dead processes on this host. Then check the tracking store (failing fast when it is
    unreachable) and, once per process, close its abandoned runs."""
    host, logger = socket.gethostname(), get_run_logger()
    host_tag, pid_tag = f"{HOST_TAG}:", f"{PID_TAG}:"
    recover = top_level and not _recovered.is_set()
    with get_client(sync_client=True) as client:
        context = FlowRunContext.get()
        own = context.flow_run if context is not None and context.flow_run is not None else None
        if own is None:
            own = client.read_flow_run(runtime.flow_run.id)
        client.update_flow_run(own.id, tags=[*own.tags, host_tag + host, pid_tag + str(os.getpid())])
        if recover:
            _recovered.set()
            running = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(
                    state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING])),
                    tags=FlowRunFilterTags(all_=[host_tag + host]),
                )
            )
            for run in running:
                pid = next((int(tag.removeprefix(pid_tag)) for tag in run.tags if tag.startswith(pid_tag)), None)
                if pid is None or process_exists(pid):
                    continue
                message = (
                    f"process {pid} on {host} ended while the flow run was running; marked by process {os.getpid()}"
                )
                client.set_flow_run_state(run.id, Crashed(message=message), force=True)
                logger.warning("flow run %s (%s): %s", run.name, run.id, message)
    steps.prepare_tracking(recover)
