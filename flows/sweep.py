"""The sweep flow: one experiment over a grid of learning rates (× optimisers × seeds), one MLflow
parent run with a child per configuration."""

from __future__ import annotations

import time
from typing import Any

from prefect import flow, get_run_logger
from prefect.futures import PrefectFuture

from flows.fit import flow_run_tags
from flows.recovery import recover_abandoned_runs
from tasks import steps
from tasks.errors import InputError
from tasks.experiment import SplitSample
from tasks.recording import tracking_uri
from tasks.spec import ExperimentSpec

POLL_SECONDS = 2.0


@flow(name="sweep", flow_run_name="{spec.name} sweep")
def sweep(spec: ExperimentSpec) -> dict[str, Any]:
    """Check every configuration's input, start the parent run (which also creates the tracking
    store before anything fans out), fit every configuration concurrently, then record the
    comparison and the best run on the parent. Bad input fails the sweep before the parent exists;
    a configuration that fails or diverges is listed as failed and the sweep itself completes; a
    sweep stopped by an error leaves its parent FAILED with the reason."""
    configurations = spec.configurations()
    recover_abandoned_runs()
    loaded = load_checked(configurations)
    parent = steps.start_sweep(spec, flow_run_tags())
    try:
        if spec.sweep is not None and spec.sweep.fan_out == "deployment":
            missing = _fit_on_workers(configurations, parent, spec.sweep.deployment, spec.sweep.timeout_seconds)
        elif spec.sweep is not None and spec.sweep.fan_out == "batched":
            missing = _fit_batched(configurations, parent, loaded)
        else:
            missing = fit_in_threads(configurations, parent, loaded)
        summary = steps.finish_sweep(parent, missing)
    except BaseException as error:
        steps.fail_run(parent, f"the sweep stopped: {type(error).__name__}: {error}"[:500])
        raise
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


def load_checked(configurations: list[ExperimentSpec]) -> dict[str, SplitSample]:
    """Each distinct data set, loaded and checked with the configurations' fixed and initial
    values: an InputError here fails the sweep instead of producing a sweep of failed children."""
    loaded: dict[str, SplitSample] = {}
    for configuration in configurations:
        key = configuration.data.model_dump_json()
        if key not in loaded:
            loaded[key] = steps.load_data(configuration)
            steps.build_problem(configuration, loaded[key])
    return loaded


def fit_in_threads(configurations: list[ExperimentSpec], parent: str, loaded: dict[str, SplitSample]) -> dict[str, str]:
    """The fit flow's steps as task futures, one chain per configuration, on the flow's thread
    pool, on the data loaded by `load_checked`."""
    tags = flow_run_tags()
    chains: list[tuple[ExperimentSpec, list[PrefectFuture]]] = []
    for configuration in configurations:
        data = loaded[configuration.data.model_dump_json()]
        problem = steps.build_problem.submit(configuration, data)
        result = steps.optimise.submit(problem, configuration.label())
        evaluation = steps.evaluate.submit(problem, data, result)
        recorded = steps.record.submit(configuration, data, problem, result, evaluation, parent, tags)
        chains.append((configuration, [problem, result, evaluation, recorded]))
    _await_chains(chains, parent)
    return {}


def _fit_batched(configurations: list[ExperimentSpec], parent: str, loaded: dict[str, SplitSample]) -> dict[str, str]:
    """Every configuration (one data set; they differ only in lr and optimizer, as the spec checks)
    fitted as one tensor program, then each evaluated and recorded as its own child run, exactly
    as in `fit_in_threads`."""
    tags = flow_run_tags()
    data = loaded[configurations[0].data.model_dump_json()]
    fitted = steps.optimise_batched.submit(configurations, data)
    fitted.wait()
    if not fitted.state.is_completed():
        for configuration in configurations:
            steps.record_failure(configuration, fitted.state.message or "did not complete", parent)
        return {}
    chains: list[tuple[ExperimentSpec, list[PrefectFuture]]] = []
    for configuration, (problem, result) in zip(configurations, fitted.result()):
        evaluation = steps.evaluate.submit(problem, data, result)
        recorded = steps.record.submit(configuration, data, problem, result, evaluation, parent, tags)
        chains.append((configuration, [evaluation, recorded]))
    _await_chains(chains, parent)
    return {}


def _await_chains(chains: list[tuple[ExperimentSpec, list[PrefectFuture]]], parent: str) -> None:
    """Wait for each configuration's chain of futures; one that failed or did not complete gets a
    FAILED child run with the reason."""
    for configuration, chain in chains:
        chain[-1].wait()
        failed = next((future for future in chain if future.state.is_failed() or future.state.is_crashed()), None)
        if failed is not None or not chain[-1].state.is_completed():
            reason = (failed or chain[-1]).state.message or "did not complete"
            steps.record_failure(configuration, reason, parent)


def _fit_on_workers(
    configurations: list[ExperimentSpec], parent: str, deployment: str, timeout_seconds: float
) -> dict[str, str]:
    """Each configuration as a run of the fit deployment, so any worker of its pool (another host,
    a GPU box) can take it; wait for all of them. The children log to this flow's tracking store,
    where `finish_sweep` gathers them. Every configuration comes back with its flow run's outcome,
    so `finish_sweep` lists each one that left no run under `parent` (it failed before recording,
    timed out, or logged elsewhere): none is dropped silently."""
    from prefect import get_client
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL
    from prefect.states import Cancelling

    uri = tracking_uri()
    if not uri.startswith(("http://", "https://")):
        get_run_logger().warning(
            "fan_out 'deployment' records into %s, which workers on other hosts cannot reach; "
            "set MLFLOW_TRACKING_URI to an MLflow server (make serve starts one)", uri
        )
    outcomes: dict[str, str] = {}
    with get_client(sync_client=True) as client:
        try:
            client.read_deployment_by_name(deployment)
        except ObjectNotFound:
            server = PREFECT_API_URL.value() or "a temporary Prefect server"
            raise InputError(
                f"sweep.deployment {deployment!r} is not deployed on {server}; deploy it (make serve, or "
                "prefect deploy --all with PREFECT_API_URL set) or use fan_out: threads"
            ) from None
        pending = {
            configuration.label(): run_deployment(
                deployment,
                parameters={"spec": configuration.model_dump(mode="json"), "parent_run_id": parent},
                # merged over the deployment's own env (a GPU pool's CUDA_VISIBLE_DEVICES stays)
                job_variables={"env": {"MLFLOW_TRACKING_URI": uri}},
                timeout=0,
            ).id
            for configuration in configurations
        }
        deadline = time.monotonic() + timeout_seconds
        while pending and time.monotonic() < deadline:
            for label, flow_run_id in list(pending.items()):
                state = client.read_flow_run(flow_run_id).state
                if state is not None and state.is_final():
                    pending.pop(label)
                    if state.is_completed():
                        outcomes[label] = f"flow run {flow_run_id} completed but left no run under this sweep in {uri}"
                    else:
                        outcomes[label] = f"flow run {flow_run_id} {state.type.value.lower()}: {state.message or ''}"
            if pending:
                time.sleep(POLL_SECONDS)
        for label, flow_run_id in pending.items():
            # a child that starts later must not record under a parent that is already finished
            client.set_flow_run_state(flow_run_id, Cancelling(message=f"sweep stopped waiting after {timeout_seconds:g} s"))
            outcomes[label] = f"flow run {flow_run_id} did not finish within {timeout_seconds:g} s (cancelled)"
    return outcomes
