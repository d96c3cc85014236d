"""The sweep flow: one experiment over a grid of learning rates (× optimisers × seeds), one MLflow
parent run with a child per configuration."""

from __future__ import annotations

import time
from typing import Any

from prefect import flow, get_run_logger
from prefect.futures import PrefectFuture

from flows.fit import flow_run_tags
from tasks import steps
from tasks.spec import ExperimentSpec

POLL_SECONDS = 2.0


@flow(name="sweep", flow_run_name="{spec.name} sweep")
def sweep(spec: ExperimentSpec) -> dict[str, Any]:
    """Start the parent run (which also creates the tracking store before anything fans out), fit
    every configuration concurrently, then record the comparison and the best run on the parent.
    A configuration that fails or diverges is listed as failed; the sweep itself completes."""
    configurations = spec.configurations()
    parent = steps.start_sweep(spec, flow_run_tags())
    if spec.sweep is not None and spec.sweep.fan_out == "deployment":
        missing = _fit_on_workers(configurations, parent, spec.sweep.deployment, spec.sweep.timeout_seconds)
    else:
        missing = _fit_in_threads(configurations, parent)
    summary = steps.finish_sweep(parent, missing)
    logger = get_run_logger()
    for name, reason in summary.failed.items():
        logger.warning("%s failed: %s", name, reason)
    return {
        "experiment": spec.name,
        "parent_run_id": summary.parent_run_id,
        "best_run_id": summary.best_run_id,
        "failed": summary.failed,
        "runs": summary.table.to_dict(orient="records"),
    }


def _fit_in_threads(configurations: list[ExperimentSpec], parent: str) -> dict[str, str]:
    """The fit flow's steps as task futures, one chain per configuration, on the flow's thread
    pool; configurations that share their data share one load."""
    tags = flow_run_tags()
    loads: dict[str, PrefectFuture] = {}
    chains: list[tuple[ExperimentSpec, list[PrefectFuture]]] = []
    for configuration in configurations:
        key = configuration.data.model_dump_json()
        data = loads.setdefault(key, steps.load_data.submit(configuration))
        problem = steps.build_problem.submit(configuration, data)
        result = steps.optimise.submit(problem, configuration.label())
        evaluation = steps.evaluate.submit(problem, data, result)
        recorded = steps.record.submit(configuration, data, problem, result, evaluation, parent, tags)
        chains.append((configuration, [data, problem, result, evaluation, recorded]))
    for configuration, chain in chains:
        chain[-1].wait()
        failed = next((future for future in chain if future.state.is_failed() or future.state.is_crashed()), None)
        if failed is not None or not chain[-1].state.is_completed():
            reason = (failed or chain[-1]).state.message or "did not complete"
            steps.record_failure(configuration, reason, parent)
    return {}


def _fit_on_workers(
    configurations: list[ExperimentSpec], parent: str, deployment: str, timeout_seconds: float
) -> dict[str, str]:
    """Each configuration as a run of the fit deployment, so any worker of its pool (another host,
    a GPU box) can take it; wait for all of them and name those that left no result."""
    from prefect import get_client
    from prefect.deployments import run_deployment

    submitted = {
        configuration.label(): run_deployment(
            deployment,
            parameters={"spec": configuration.model_dump(mode="json"), "parent_run_id": parent},
            timeout=0,
        ).id
        for configuration in configurations
    }
    missing: dict[str, str] = {}
    deadline = time.monotonic() + timeout_seconds
    with get_client(sync_client=True) as client:
        pending = dict(submitted)
        while pending and time.monotonic() < deadline:
            for label, flow_run_id in list(pending.items()):
                state = client.read_flow_run(flow_run_id).state
                if state is not None and state.is_final():
                    pending.pop(label)
                    if not state.is_completed():
                        missing[label] = f"flow run {flow_run_id} {state.type.value.lower()}: {state.message or ''}"
            if pending:
                time.sleep(POLL_SECONDS)
        for label, flow_run_id in pending.items():
            missing[label] = f"flow run {flow_run_id} did not finish within {timeout_seconds:g} s"
    return missing
