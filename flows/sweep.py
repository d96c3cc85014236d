"""The sweep flow: one experiment over a grid of learning rates (× optimisers × seeds), one MLflow
parent run with a child per configuration, ranked by NLL (a network's by its validation NLL)."""

from __future__ import annotations

import time
from typing import Any

from prefect import flow, get_run_logger, runtime
from prefect.futures import PrefectFuture
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from nllflow.errors import InputError
from nllflow.flows.fit import flow_run_tags, started_by_a_deployment
from nllflow.flows.recovery import recover_abandoned_runs
from nllflow.pipeline import prefect_tasks as steps
from nllflow.pipeline.steps import SplitSample, data_key
from nllflow.spec import ExperimentSpec, SpecFile, resolve_spec
from nllflow.tracking.recorder import Tracker, run_key
from nllflow.tracking.store import tracking_uri

POLL_SECONDS = 2.0
# configurations fitted at once in threads: more only contend for the cores, and for a SQLite
# store's connections (MLflow's pool of 5 + 10: 50 at once failed a third of them on its timeout)
THREADS = 8


@flow(name="sweep", flow_run_name="{spec.name} sweep", task_runner=ThreadPoolTaskRunner(max_workers=THREADS))
def sweep(spec: ExperimentSpec | SpecFile) -> dict[str, Any]:
    """Check every configuration's input, start the parent run (which also creates the tracking
    store before anything fans out), fit every configuration concurrently, then record the
    comparison and the best run on the parent. Bad input fails the sweep before the parent exists;
    a configuration that fails or diverges is listed as failed and the sweep itself completes; a
    sweep stopped by an error leaves its parent FAILED with the reason. `timings.total`: the flow
    body's wall time (seconds)."""
    started = time.perf_counter()
    spec = resolve_spec(spec, restricted=started_by_a_deployment())
    configurations = spec.configurations()
    recover_abandoned_runs()
    loaded = steps.check(spec)
    parent = steps.start_sweep(spec, flow_run_tags(), run_key(str(runtime.flow_run.id), "sweep"))
    try:
        if spec.sweep is not None and spec.sweep.fan_out == "deployment":
            missing = _fit_on_workers(configurations, parent, spec.sweep.deployment, spec.sweep.timeout_seconds)
        elif spec.sweep is not None and spec.sweep.fan_out == "batched":
            missing = _fit_batched(configurations, parent, loaded)
        elif spec.sweep is not None and spec.sweep.fan_out == "dask":
            missing = _fit_on_dask(configurations, parent, loaded, spec.sweep.dask_address)
        else:
            missing = fit_as_tasks(configurations, parent, loaded)
        summary = steps.finish_sweep(parent, missing, spec.rank_by)
    except BaseException as error:
        steps.fail_run(parent, f"the sweep stopped: {type(error).__name__}: {error}"[:500])
        raise
    logger = get_run_logger()
    for name, reason in summary.failed.items():
        logger.warning("%s failed: %s", name, reason)
    return {
        "experiment": spec.name,
        "experiment_id": Tracker().experiment_id(spec.name),
        "tracking_uri": tracking_uri(),
        "parent_run_id": summary.parent_run_id,
        "best_run_id": summary.best_run_id,
        "failed": summary.failed,
        "runs": summary.table.to_dict(orient="records"),
        "timings": {"total": time.perf_counter() - started},
    }


def fit_as_tasks(
    configurations: list[ExperimentSpec],
    parent: str,
    loaded: dict[str, SplitSample],
    runner: TaskRunner | None = None,
) -> dict[str, str]:
    """Each configuration as one task run of the fit's steps (`steps.fit_configuration`), on the data
    that `steps.check` loaded, on `runner` (default: the flow's own, a thread pool; a Dask cluster
    for `_fit_on_dask`); then wait for all of them. The children record into this flow's tracking
    store, named explicitly: a task on a Dask worker does not see this process's environment."""
    tags, uri = flow_run_tags(), tracking_uri()
    chains: list[tuple[ExperimentSpec, list[PrefectFuture]]] = []
    for configuration in configurations:
        parameters = {
            "spec": configuration,
            "data": loaded[data_key(configuration)],
            "parent_run_id": parent,
            "tags": tags,
            "key": child_key(parent, configuration),
            "uri": uri,
        }
        if runner is None:
            fitted = steps.fit_configuration.submit(**parameters)
        else:
            fitted = runner.submit(steps.fit_configuration, parameters)
        chains.append((configuration, [fitted]))
    _await_chains(chains, parent)
    return {}


def _fit_batched(configurations: list[ExperimentSpec], parent: str, loaded: dict[str, SplitSample]) -> dict[str, str]:
    """Every configuration (one data set; they differ only in lr and optimizer, as the spec checks)
    fitted as one tensor program, then each evaluated and recorded as its own child run, exactly
    as in `fit_as_tasks`."""
    tags = flow_run_tags()
    data = loaded[data_key(configurations[0])]
    fitted = steps.optimise_batched.submit(configurations, data)
    fitted.wait()
    if not fitted.state.is_completed():
        for configuration in configurations:
            steps.record_failure(
                configuration, fitted.state.message or "did not complete", parent, child_key(parent, configuration)
            )
        return {}
    chains: list[tuple[ExperimentSpec, list[PrefectFuture]]] = []
    for configuration, (problem, result) in zip(configurations, fitted.result(), strict=True):
        evaluation = steps.evaluate.submit(problem, data, result)
        recorded = steps.record.submit(
            configuration, data, problem, result, evaluation, parent, tags, child_key(parent, configuration)
        )
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
            steps.record_failure(configuration, reason, parent, child_key(parent, configuration))


def _fit_on_dask(
    configurations: list[ExperimentSpec], parent: str, loaded: dict[str, SplitSample], address: str
) -> dict[str, str]:
    """The tasks of `fit_as_tasks`, run on the Dask scheduler at `address` (its workers may be on
    other hosts: they need nllflow installed and the tracking server reachable), or on a
    LocalCluster of this host (one single-threaded worker process per core) when it is empty."""
    from prefect import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect_dask import DaskTaskRunner

    if address:
        _warn_unless_server(tracking_uri(), "dask")
        runner = DaskTaskRunner(address=address)
    else:
        runner = DaskTaskRunner(cluster_kwargs={"threads_per_worker": 1, "dashboard_address": None})
    with get_client(sync_client=True) as client:
        api_url = str(client.api_url)
    # the tasks take their settings to the workers: name this process's Prefect server in them, also
    # a temporary one (without it each worker process would start a temporary server of its own)
    with temporary_settings({PREFECT_API_URL: api_url}), runner:
        return fit_as_tasks(configurations, parent, loaded, runner)


def _warn_unless_server(uri: str, fan_out: str) -> None:
    if not uri.startswith(("http://", "https://")):
        get_run_logger().warning(
            "fan_out %r records into %s, which workers on other hosts cannot reach; "
            "set MLFLOW_TRACKING_URI to an MLflow server (make serve starts one)",
            fan_out,
            uri,
        )


def child_key(parent: str, configuration: ExperimentSpec) -> str:
    """A child run's idempotency key: its parent and its configuration (the same on every retry,
    on whichever worker or thread it runs)."""
    return run_key(parent, configuration.label())


def _fit_on_workers(
    configurations: list[ExperimentSpec], parent: str, deployment: str, timeout_seconds: float
) -> dict[str, str]:
    """Each configuration as a run of the fit deployment, so any worker of its pool (another host,
    a GPU box) can take it; wait for all of them. The children log to this flow's tracking store,
    where `finish_sweep` gathers them. Every configuration comes back with its flow run's outcome,
    so `finish_sweep` lists each one that left no run under `parent` (it failed before recording,
    timed out, or logged elsewhere): none is dropped silently."""
    from prefect import get_client
    from prefect.client.schemas.responses import SetStateStatus
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL
    from prefect.states import Cancelled, Cancelling

    uri = tracking_uri()
    _warn_unless_server(uri, "deployment")
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
            message = f"sweep stopped waiting after {timeout_seconds:g} s"
            state = client.read_flow_run(flow_run_id).state
            # one that no worker has taken has nothing to stop: Cancelled at once (a final state: a
            # worker taking it meanwhile is refused its start); else Cancelling, which its worker
            # carries out
            cancelled = False
            if state is not None and state.is_scheduled():
                result = client.set_flow_run_state(flow_run_id, Cancelled(message=message))
                cancelled = result.status == SetStateStatus.ACCEPT
            if not cancelled:
                client.set_flow_run_state(flow_run_id, Cancelling(message=message))
            outcomes[label] = f"flow run {flow_run_id} did not finish within {timeout_seconds:g} s (cancelled)"
    return outcomes
