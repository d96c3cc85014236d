"""The fit flow: one experiment, one configuration."""

from __future__ import annotations

import time
from typing import Any

from prefect import flow, runtime
from prefect.states import Completed, Failed, State

from nllflow.evaluation.summary import fit_summary
from nllflow.flows.recovery import recover_abandoned_runs
from nllflow.pipeline import prefect_tasks as steps
from nllflow.spec import ExperimentSpec, SpecFile, resolve_spec
from nllflow.tracking.recorder import Tracker, run_key
from nllflow.tracking.store import tracking_uri


def started_by_a_deployment() -> bool:
    """Whether this flow run came through a deployment (its parameters from whoever started it),
    itself or as a child of a deployment's flow run."""
    import prefect.context

    # the engine sets this context variable for a deployment's flow run and its children; without
    # it, `runtime.deployment.id` reads the flow run back from the API (a request per flow)
    deployment_id = getattr(prefect.context, "_deployment_id", None)
    if deployment_id is None:
        return runtime.deployment.id is not None
    context = prefect.context.FlowRunContext.get()
    own = context.flow_run.deployment_id if context is not None and context.flow_run is not None else None
    return own is not None or deployment_id.get() is not None


def flow_run_tags() -> dict[str, str]:
    return {"prefect.flow_run_id": str(runtime.flow_run.id), "prefect.flow_run_name": str(runtime.flow_run.name)}


@flow(name="fit", flow_run_name="{spec.name}")
def fit(spec: ExperimentSpec | SpecFile, parent_run_id: str | None = None) -> State:
    """Check the input → build the problem → optimise the NLL → evaluate → record in MLflow.

    Completed with the fit's summary; Failed (with the same summary as its data) when the fit
    diverged, so the Prefect UI and the MLflow run agree. A child of a sweep (`parent_run_id`)
    records under that parent, once per configuration however often it is run.
    """
    started = time.perf_counter()
    spec = resolve_spec(spec, restricted=started_by_a_deployment())
    recover_abandoned_runs(top_level=parent_run_id is None)
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = now - clock
        clock = now

    data = next(iter(steps.check(spec).values()))
    problem = steps.build_problem(spec, data)
    lap("load")
    result = steps.optimise(problem, spec.label())
    lap("fit")
    evaluation = steps.evaluate(problem, data, result)
    lap("evaluate")
    key = run_key(parent_run_id or str(runtime.flow_run.id), spec.label())
    run_id = steps.record(spec, data, problem, result, evaluation, parent_run_id, flow_run_tags(), key)
    lap("record")
    # the whole flow body: the laps plus the recovery of abandoned runs and the tasks' own overhead
    timings["total"] = time.perf_counter() - started
    summary: dict[str, Any] = {
        **fit_summary(result, evaluation),
        "run_id": run_id,
        "experiment": spec.name,
        "experiment_id": Tracker().experiment_id(spec.name),
        "tracking_uri": tracking_uri(),
        "dropped": data.full.dropped,
        "device": problem.device,
        "dtype": problem.dtype,
        "timings": timings,
    }
    if result.diverged:
        return Failed(message=result.reason, data=summary)
    return Completed(data=summary)
