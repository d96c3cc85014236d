"""What killed processes leave behind, closed at the start of every flow.

A process killed with SIGKILL (the OOM killer, `kill -9`, a lost machine) cannot close what it
started: its Prefect flow run stays Running and a sweep's MLflow parent run stays RUNNING. So each
flow first tags its own flow run with the host and process that run it, then, on this host, marks
Crashed the Running flow runs whose process no longer exists, and KILLED the MLflow runs left
RUNNING by such processes (`Tracker.close_abandoned_runs`, through `steps.prepare_tracking`).
A worker does the Prefect half itself for the flow runs it started; this covers the `nllflow`
command and `flow.serve()`, where no worker watches the process.
"""

from __future__ import annotations

import os
import socket

from prefect import get_client, get_run_logger, runtime
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType, FlowRunFilterTags
from prefect.client.schemas.objects import StateType
from prefect.states import Crashed

from tasks import steps
from tasks.recording import process_exists

HOST_TAG, PID_TAG = "nllflow.host:", "nllflow.pid:"


def recover_abandoned_runs() -> None:
    """Claim this flow run for this process, crash the flow runs of dead processes on this host,
    then check the tracking store (failing fast when it is unreachable) and close its abandoned runs."""
    host, logger = socket.gethostname(), get_run_logger()
    with get_client(sync_client=True) as client:
        own = client.read_flow_run(runtime.flow_run.id)
        client.update_flow_run(own.id, tags=[*own.tags, HOST_TAG + host, PID_TAG + str(os.getpid())])
        running = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING])),
                tags=FlowRunFilterTags(all_=[HOST_TAG + host]),
            )
        )
        for run in running:
            pid = next((int(tag.removeprefix(PID_TAG)) for tag in run.tags if tag.startswith(PID_TAG)), None)
            if pid is None or process_exists(pid):
                continue
            message = f"process {pid} on {host} ended while the flow run was running; marked by process {os.getpid()}"
            client.set_flow_run_state(run.id, Crashed(message=message), force=True)
            logger.warning("flow run %s (%s): %s", run.name, run.id, message)
    steps.prepare_tracking()
