"""The Prefect tasks: thin wrappers over the pipeline steps (`steps`) and the recorder.

Tasks take and return in-memory objects (data, tensors), so none of them caches or persists
results: hashing a million-point sample for a cache key would cost more than the step. Only the
recording tasks retry (transient I/O), and recording is idempotent: a retry completes the run the
failed attempt started.
"""

from __future__ import annotations

import threading
import time
from typing import Mapping

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from nllflow.evaluation.summary import Evaluation
from nllflow.fitting.mle import FitResult
from nllflow.pipeline import steps
from nllflow.pipeline.steps import ComparisonPlan, FitProblem, SplitSample
from nllflow.spec import ComparisonSpec, ExperimentSpec
from nllflow.tracking.recorder import SweepSummary, Tracker
from nllflow.tracking.store import PID_TAG, check_tracking

PROGRESS_EVERY_SECONDS = 2.0
PROGRESS_BAR_WIDTH = 20
RECORD_RETRIES, RECORD_RETRY_DELAY_SECONDS = 2, 2


@task(name="check input", cache_policy=NO_CACHE)
def check(spec: ExperimentSpec) -> dict[str, SplitSample]:
    """Every configuration's data, fixed and initial values (steps.check): an InputError here fails
    the flow before any run exists."""
    loaded = steps.check(spec)
    logger = get_run_logger()
    for data in loaded.values():
        logger.info("loaded %s: n=%d, fingerprint %s", data.full.source, data.full.n, data.full.fingerprint)
    return loaded


@task(name="build problem", cache_policy=NO_CACHE)
def build_problem(spec: ExperimentSpec, data: SplitSample) -> FitProblem:
    return steps.build_problem(spec, data)


@task(name="optimise", cache_policy=NO_CACHE)
def optimise(problem: FitProblem, label: str) -> FitResult:
    logger = get_run_logger()
    last = [time.monotonic()]

    def progress(step: int, mean_nll: float) -> None:
        now = time.monotonic()
        if now - last[0] >= PROGRESS_EVERY_SECONDS:
            last[0] = now
            total = problem.settings.max_steps
            filled = min(PROGRESS_BAR_WIDTH, round(PROGRESS_BAR_WIDTH * step / total))
            bar = "█" * filled + "░" * (PROGRESS_BAR_WIDTH - filled)
            logger.info("%s: [%s] step %d/%d, mean NLL %.10g", label, bar, step, total, mean_nll)

    result = steps.optimise(problem, progress)
    log = logger.warning if not result.converged else logger.info
    log("%s: %s after %d steps, NLL %.10g", label, result.reason, result.steps, result.nll)
    return result


@task(name="optimise batched", cache_policy=NO_CACHE)
def optimise_batched(configurations: list[ExperimentSpec], data: SplitSample) -> list[tuple[FitProblem, FitResult]]:
    """Every configuration of a batched sweep in one tensor program (nllflow.fitting.batched)."""
    from nllflow.fitting.batched import fit_problems

    problems = [steps.build_problem(configuration, data) for configuration in configurations]
    results = fit_problems(problems)
    logger = get_run_logger()
    for configuration, result in zip(configurations, results, strict=True):
        log = logger.warning if not result.converged else logger.info
        log("%s: %s after %d steps, NLL %.10g", configuration.label(), result.reason, result.steps, result.nll)
    return list(zip(problems, results, strict=True))


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate(problem: FitProblem, data: SplitSample, result: FitResult) -> Evaluation | None:
    return steps.evaluate(problem, data, result)


@task(name="record", cache_policy=NO_CACHE, retries=RECORD_RETRIES, retry_delay_seconds=RECORD_RETRY_DELAY_SECONDS)
def record(
    spec: ExperimentSpec,
    data: SplitSample,
    problem: FitProblem,
    result: FitResult,
    evaluation: Evaluation | None,
    parent_run_id: str | None,
    tags: Mapping[str, str],
    key: str,
    uri: str | None = None,
) -> str:
    """Into the tracking store `uri` (default: this process's), which a task on a Dask worker
    gets from the flow that submitted it."""
    return Tracker(uri).record_fit(
        spec, data, problem, result, evaluation, key=key, parent_run_id=parent_run_id, tags=tags
    )


@task(name="fit configuration", cache_policy=NO_CACHE)
def fit_configuration(
    spec: ExperimentSpec,
    data: SplitSample,
    parent_run_id: str,
    tags: Mapping[str, str],
    key: str,
    uri: str | None = None,
) -> str:
    """A configuration of a sweep as one task: the fit flow's steps one after the other, each a
    task run of its own (`record` with its retries), in the thread or on the Dask worker that runs
    it. One task per configuration, not one per step: a Dask worker rebuilds Prefect's settings and
    clients for every task it is sent (0.1–0.3 s each on 2 cores), which outweighs a small fit."""
    problem = build_problem(spec, data)
    result = optimise(problem, spec.label())
    evaluation = evaluate(problem, data, result)
    return record(spec, data, problem, result, evaluation, parent_run_id, tags, key, uri)


@task(
    name="record failure", cache_policy=NO_CACHE, retries=RECORD_RETRIES, retry_delay_seconds=RECORD_RETRY_DELAY_SECONDS
)
def record_failure(spec: ExperimentSpec, reason: str, parent_run_id: str | None, key: str) -> str:
    return Tracker().record_failure(spec, reason, key=key, parent_run_id=parent_run_id)


_recovered_in_process = threading.Event()


@task(name="prepare tracking", cache_policy=NO_CACHE)
def prepare_tracking(recover: bool) -> list[str]:
    """Fail fast when the tracking server is unreachable; once per process (when `recover`), close
    the runs that dead processes of this host left RUNNING (their ids)."""
    check_tracking()
    if not recover or _recovered_in_process.is_set():
        return []
    _recovered_in_process.set()
    closed = Tracker().close_abandoned_runs()
    for run in closed:
        get_run_logger().warning(
            "closed MLflow run %s (%s), left RUNNING by the dead process %s",
            run.info.run_name,
            run.info.run_id,
            run.data.tags[PID_TAG],
        )
    return [run.info.run_id for run in closed]


@task(name="fail run", cache_policy=NO_CACHE, retries=RECORD_RETRIES, retry_delay_seconds=RECORD_RETRY_DELAY_SECONDS)
def fail_run(run_id: str, reason: str) -> None:
    Tracker().fail_run(run_id, reason)


@task(name="start sweep", cache_policy=NO_CACHE, retries=RECORD_RETRIES, retry_delay_seconds=RECORD_RETRY_DELAY_SECONDS)
def start_sweep(spec: ExperimentSpec, tags: Mapping[str, str], key: str) -> str:
    return Tracker().start_sweep(spec, tags, key)


@task(
    name="finish sweep", cache_policy=NO_CACHE, retries=RECORD_RETRIES, retry_delay_seconds=RECORD_RETRY_DELAY_SECONDS
)
def finish_sweep(parent_run_id: str, missing: Mapping[str, str], rank_by: str = "nll") -> SweepSummary:
    return Tracker().finish_sweep(parent_run_id, missing, rank_by=rank_by)


@task(name="plan comparison", cache_policy=NO_CACHE)
def plan_comparison(spec: ComparisonSpec) -> ComparisonPlan:
    plan = steps.plan_comparison(spec)
    logger = get_run_logger()
    logger.info("comparing %s", ", ".join(c.family for c in plan.configurations))
    for name, reason in {**plan.skipped, **plan.notes}.items():
        logger.info("%s: %s", name, reason)
    return plan


@task(
    name="start comparison",
    cache_policy=NO_CACHE,
    retries=RECORD_RETRIES,
    retry_delay_seconds=RECORD_RETRY_DELAY_SECONDS,
)
def start_comparison(spec: ComparisonSpec, families: list[str], tags: Mapping[str, str], key: str) -> str:
    return Tracker().start_comparison(spec, families, tags, key)


@task(
    name="finish comparison",
    cache_policy=NO_CACHE,
    retries=RECORD_RETRIES,
    retry_delay_seconds=RECORD_RETRY_DELAY_SECONDS,
)
def finish_comparison(parent_run_id: str, missing: Mapping[str, str], data: SplitSample) -> SweepSummary:
    return Tracker().finish_comparison(parent_run_id, missing, data.train)
