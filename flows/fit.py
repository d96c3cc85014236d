"""The fit flow: one experiment, one configuration."""

from __future__ import annotations

import time
from typing import Any

from prefect import flow, runtime
from prefect.states import Completed, Failed, State

from flows.recovery import recover_abandoned_runs
from tasks import steps
from tasks.evaluation import fit_summary
from tasks.recording import tracking_uri
from tasks.spec import ExperimentSpec


def flow_run_tags() -> dict[str, str]:
    return {"prefect.flow_run_id": str(runtime.flow_run.id), "prefect.flow_run_name": str(runtime.flow_run.name)}


@flow(name="fit", flow_run_name="{spec.name}")
def fit(spec: ExperimentSpec, parent_run_id: str | None = None) -> State:
    """Load data → build the problem → optimise the NLL → evaluate → record in MLflow.

    Completed with the fit's summary; Failed (with the same summary as its data) when the fit
    diverged, so the Prefect UI and the MLflow run agree.
    """
    started = time.perf_counter()
    recover_abandoned_runs()
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = now - clock
        clock = now

    data = steps.load_data(spec)
    problem = steps.build_problem(spec, data)
    lap("load")
    result = steps.optimise(problem, spec.label())
    lap("fit")
    evaluation = steps.evaluate(problem, data, result)
    lap("evaluate")
    run_id = steps.record(spec, data, problem, result, evaluation, parent_run_id, flow_run_tags())
    lap("record")
    # the whole flow body: the laps plus the recovery of abandoned runs and the tasks' own overhead
    timings["total"] = time.perf_counter() - started
    summary: dict[str, Any] = {
        **fit_summary(result, evaluation),
        "run_id": run_id,
        "experiment": spec.name,
        "tracking_uri": tracking_uri(),
        "device": problem.device,
        "dtype": problem.dtype,
        "timings": timings,
    }
    if result.diverged:
        return Failed(message=result.reason, data=summary)
    return Completed(data=summary)
