"""The Prefect tasks: thin wrappers over the core steps (tasks.experiment, tasks.recording).

Tasks take and return in-memory objects (data, tensors), so none of them caches or persists
results: hashing a million-point sample for a cache key would cost more than the step.
"""

from __future__ import annotations

import time
from typing import Mapping

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks import experiment
from tasks.evaluation import Evaluation
from tasks.experiment import ComparisonPlan, FitProblem, SplitSample
from tasks.fitting import FitResult
from tasks.recording import PID_TAG, SweepSummary, Tracker, check_tracking
from tasks.spec import ComparisonSpec, ExperimentSpec

PROGRESS_EVERY_SECONDS = 2.0
PROGRESS_BAR_WIDTH = 20


@task(name="load data", cache_policy=NO_CACHE)
def load_data(spec: ExperimentSpec) -> SplitSample:
    data = experiment.load_data(spec)
    get_run_logger().info("loaded %s: n=%d, fingerprint %s", data.full.source, data.full.n, data.full.fingerprint)
    return data


@task(name="build problem", cache_policy=NO_CACHE)
def build_problem(spec: ExperimentSpec, data: SplitSample) -> FitProblem:
    return experiment.build_problem(spec, data)


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

    result = experiment.optimise(problem, progress)
    log = logger.warning if not result.converged else logger.info
    log("%s: %s after %d steps, NLL %.10g", label, result.reason, result.steps, result.nll)
    return result


@task(name="optimise batched", cache_policy=NO_CACHE)
def optimise_batched(configurations: list[ExperimentSpec], data: SplitSample) -> list[tuple[FitProblem, FitResult]]:
    """Every configuration of a batched sweep in one tensor program (tasks.batched)."""
    from tasks.batched import fit_problems

    problems = [experiment.build_problem(configuration, data) for configuration in configurations]
    results = fit_problems(problems)
    logger = get_run_logger()
    for configuration, result in zip(configurations, results):
        log = logger.warning if not result.converged else logger.info
        log("%s: %s after %d steps, NLL %.10g", configuration.label(), result.reason, result.steps, result.nll)
    return list(zip(problems, results))


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate(problem: FitProblem, data: SplitSample, result: FitResult) -> Evaluation | None:
    """None for a diverged fit: there is no estimate to evaluate."""
    if result.diverged:
        return None
    return experiment.evaluate(problem, data, result)


@task(name="record", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
def record(
    spec: ExperimentSpec,
    data: SplitSample,
    problem: FitProblem,
    result: FitResult,
    evaluation: Evaluation | None,
    parent_run_id: str | None,
    tags: Mapping[str, str],
) -> str:
    return Tracker().record_fit(spec, data, problem, result, evaluation, parent_run_id=parent_run_id, tags=tags)


@task(name="record failure", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
def record_failure(spec: ExperimentSpec, reason: str, parent_run_id: str | None) -> str:
    return Tracker().record_failure(spec, reason, parent_run_id=parent_run_id)


@task(name="prepare tracking", cache_policy=NO_CACHE)
def prepare_tracking() -> list[str]:
    """Fail fast when the tracking server is unreachable; close the runs that dead processes of this
    host left RUNNING (their ids)."""
    check_tracking()
    closed = Tracker().close_abandoned_runs()
    for run in closed:
        get_run_logger().warning("closed MLflow run %s (%s), left RUNNING by the dead process %s",
                                 run.info.run_name, run.info.run_id, run.data.tags[PID_TAG])
    return [run.info.run_id for run in closed]


@task(name="fail run", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
def fail_run(run_id: str, reason: str) -> None:
    Tracker().fail_run(run_id, reason)


@task(name="start sweep", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
def start_sweep(spec: ExperimentSpec, tags: Mapping[str, str]) -> str:
    return Tracker().start_sweep(spec, tags)


@task(name="finish sweep", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
def finish_sweep(parent_run_id: str, missing: Mapping[str, str]) -> SweepSummary:
    return Tracker().finish_sweep(parent_run_id, missing)


@task(name="plan comparison", cache_policy=NO_CACHE)
def plan_comparison(spec: ComparisonSpec) -> ComparisonPlan:
    plan = experiment.plan_comparison(spec)
    logger = get_run_logger()
    logger.info("comparing %s", ", ".join(c.family for c in plan.configurations))
    for name, reason in {**plan.skipped, **plan.notes}.items():
        logger.info("%s: %s", name, reason)
    return plan


@task(name="start comparison", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
def start_comparison(spec: ComparisonSpec, families: list[str], tags: Mapping[str, str]) -> str:
    return Tracker().start_comparison(spec, families, tags)


@task(name="finish comparison", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
def finish_comparison(parent_run_id: str, missing: Mapping[str, str], data: SplitSample) -> SweepSummary:
    return Tracker().finish_comparison(parent_run_id, missing, data.train)
