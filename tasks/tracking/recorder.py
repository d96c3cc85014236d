"""MLflow recording: the one module that writes runs.

Every fit becomes a run with its parameters, the per-step trace as metric histories and as
`trace.parquet`, the fit table `fit.parquet`, summary metrics (at step 0, apart from the histories),
the data as an MLflow dataset input, a Markdown description and plots (rendered after the command's
answer where the CLI defers them: nllflow.tracking.deferred). A sweep is a parent run whose
children carry `mlflow.parentRunId` explicitly (MLflow's active run is thread-local, so nothing here
relies on it); the parent gathers its children from the tracking store, so it works the same whether
they ran in threads, on Dask workers or on other hosts.

Recording is idempotent: every run is found or created by an idempotency key (`nllflow.key`: the
flow run or parent run and the configuration), every metric point has a timestamp taken from the
fit itself and a step that an earlier attempt did not log, params are the same values, artifacts
overwrite. A retried task, a rescheduled Dask task (which fits again) or a rerun child flow therefore
completes the run it started instead of adding a second one or doubling its histories.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import re
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import pandas as pd
import yaml

from nllflow.data.samples import Sample
from nllflow.evaluation.summary import Evaluation, fit_table, jsonable
from nllflow.families import get_family
from nllflow.fitting.mle import FitResult
from nllflow.models.constant import unflatten
from nllflow.pipeline.steps import FitProblem, SplitSample
from nllflow.spec import ComparisonSpec, ExperimentSpec
from nllflow.tracking import deferred
from nllflow.tracking.store import (
    HOST_TAG,
    PID_TAG,
    nllflow_home,
    open_client,
    owner_tags,
    process_exists,
    tracking_uri,
)

if TYPE_CHECKING:  # MLflow is imported where a run is recorded, not where this module is
    from mlflow.entities import Run

MAX_METRICS_PER_BATCH = 1000
MAX_METRIC_ROWS_PER_INSERT = 5000
MAX_KEYED_RUNS = 100  # runs that may share an idempotency key before they are settled
# the children of a sweep in threads log the same dataset at once
_DATASETS_LOCK = threading.Lock()
PROJECT_ROOT = Path(__file__).resolve().parents[2]
PARENT_TAG = "mlflow.parentRunId"
# the colour MLflow's UI draws a run in (its own choice, a hash of the run id, repeats colours
# within a handful of runs)
COLOUR_TAG = "mlflow.runColor"
KEY_TAG = "nllflow.key"
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
# set while a run's figures wait for the command's answer (nllflow.tracking.deferred), removed once logged
PLOTS_PENDING_TAG = "nllflow.plots_pending"


def run_key(*parts: str | None) -> str:
    """The idempotency key of a run: the same parts (a flow run or parent run, a configuration)
    always name the same run."""
    return hashlib.sha256("\x1f".join(part or "" for part in parts).encode()).hexdigest()[:32]


@functools.cache
def _versions() -> dict[str, str]:
    """The packages' versions, read once per process (importlib.metadata scans site-packages)."""
    return {f"version.{p}": metadata.version(p) for p in ("nllflow", "torch", "mlflow", "prefect")}


def _provenance_tags() -> dict[str, str]:
    tags = dict(_versions())
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        tags["git_commit"] = commit
    except (OSError, subprocess.SubprocessError):
        pass
    return tags


@dataclass(frozen=True)
class SweepSummary:
    parent_run_id: str
    table: pd.DataFrame
    best_run_id: str | None
    failed: dict[str, str]


class Tracker:
    """Records fits and sweeps into one MLflow tracking store."""

    def __init__(self, uri: str | None = None):
        self.uri = uri or tracking_uri()
        self.client = open_client(self.uri)

    def experiment_id(self, name: str) -> str:
        """The experiment `name`, created on first use (also when two processes race to create it),
        tagged so that MLflow's UI treats it as model training."""
        from mlflow.exceptions import MlflowException

        existing = self.client.get_experiment_by_name(name)
        if existing is not None:
            if existing.tags.get("mlflow.experimentKind") is None:
                self.client.set_experiment_tag(existing.experiment_id, *next(iter(EXPERIMENT_KIND.items())))
            return existing.experiment_id
        location = None
        if self.uri.startswith("sqlite:") or self.uri.startswith("file:"):
            location = (nllflow_home() / "artifacts").as_uri()
        try:
            return self.client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_KIND)
        except MlflowException:
            existing = self.client.get_experiment_by_name(name)
            if existing is None:
                raise
            return existing.experiment_id

    def run_for(
        self, experiment: str, key: str, run_name: str, tags: Mapping[str, str], parent: str | None = None
    ) -> Run:
        """The run with idempotency key `key` (MLflow's `Run`, with its data), created when there is none.

        Finding and creating are two requests, so two runs can get the key: a create request that
        the server carried out but whose answer was lost (the client retries it), or the same
        configuration started twice at once (a Dask task rescheduled while the first attempt still
        ran). Every caller then settles on the same one, the smallest run id, and deletes the rest;
        a writer still holding a deleted run fails, and its retry finds the survivor."""
        experiment_id = self.experiment_id(experiment)
        found = self._runs_with_key(experiment_id, key)
        if not found:
            all_tags = {**_provenance_tags(), **owner_tags(), "mlflow.source.type": "LOCAL", **tags, KEY_TAG: key}
            if parent:
                all_tags[PARENT_TAG] = parent
            self.client.create_run(experiment_id, run_name=run_name, tags=all_tags)
            found = self._runs_with_key(experiment_id, key)
        survivor, *duplicates = sorted(found, key=lambda run: run.info.run_id)
        for duplicate in duplicates:
            self.client.delete_run(duplicate.info.run_id)
        return survivor

    def _runs_with_key(self, experiment_id: str, key: str) -> list[Run]:
        return self.client.search_runs(
            [experiment_id], filter_string=f"tags.`{KEY_TAG}` = '{key}'", max_results=MAX_KEYED_RUNS
        )

    def record_fit(
        self,
        spec: ExperimentSpec,
        data: SplitSample,
        problem: FitProblem,
        result: FitResult,
        evaluation: Evaluation | None,
        *,
        key: str,
        parent_run_id: str | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> str:
        """One run for one fit; FAILED (with the reason) when the fit diverged."""
        run_tags = {"spec": spec.name, "mlflow.source.name": "nllflow fit", **(tags or {})}
        run = self.run_for(spec.name, key, spec.label(), run_tags, parent_run_id)
        run_id = run.info.run_id
        if run.info.status in ("FINISHED", "FAILED") and run.data.tags.get("nllflow.complete") == "true":
            return run_id
        from mlflow.entities import Param, RunTag

        started_ms = int(result.started_at * 1000)
        params = _fit_params(spec, data, problem)
        outcome_tags = {
            "reason": result.reason,
            "outcome": result.outcome.value,
            "converged": str(result.converged).lower(),
            "mlflow.note.content": fit_description(spec, result, evaluation),
        }
        self.client.log_batch(
            run_id,
            params=[Param(k, _param(v)) for k, v in params.items()],
            tags=[RunTag(k, v) for k, v in outcome_tags.items()],
        )
        metrics = _trace_metrics(result, started_ms) + _summary_metrics(result, evaluation, data, started_ms)
        if run.data.metrics:
            # an earlier attempt logged some: a retry has the same points (its timestamps come from the
            # same fit), but a rescheduled task fitted again, at other times; keep one point per step
            logged = {(k, m.step) for k in run.data.metrics for m in self.client.get_metric_history(run_id, k)}
            metrics = [metric for metric in metrics if (metric.key, metric.step) not in logged]
        self._log_metrics(run_id, metrics)
        self._log_dataset(run_id, data)
        with tempfile.TemporaryDirectory() as folder:
            _write_fit_artifacts(Path(folder), spec, data, problem, result, evaluation)
            self.client.log_artifacts(run_id, folder)
        if spec.record_plots:
            from nllflow.evaluation import plots

            self._record_figures(
                run_id, lambda: plots.fit_figures(spec.label(), data.train, problem.family, result, evaluation)
            )
        self.client.set_tag(run_id, "nllflow.complete", "true")
        self.client.set_terminated(run_id, "FAILED" if result.diverged else "FINISHED")
        return run_id

    def record_failure(self, spec: ExperimentSpec, reason: str, *, key: str, parent_run_id: str | None = None) -> str:
        """The run of a configuration that could not be fitted or recorded: its reason, no results
        (the same run a partial recording of it left, if any)."""

        run_id = self.run_for(
            spec.name, key, spec.label(), {"spec": spec.name, "mlflow.source.name": "nllflow fit"}, parent_run_id
        ).info.run_id
        self._log_new_params(run_id, {k: _param(v) for k, v in _spec_params(spec).items()})
        self.client.set_tag(run_id, "reason", reason)
        self.client.set_tag(run_id, "outcome", "failed")
        self.client.set_terminated(run_id, "FAILED")
        return run_id

    def start_sweep(self, spec: ExperimentSpec, tags: Mapping[str, str], key: str) -> str:
        grid = spec.sweep
        params = {
            "family": spec.family,
            "configurations": len(spec.configurations()),
            "sweep.lr": grid.lr if grid else None,
            "sweep.optimizer": grid.optimizer if grid else None,
            "sweep.seed": grid.seed if grid else None,
            "sweep.hidden": grid.hidden if grid else None,
            "sweep.weight_decay": grid.weight_decay if grid else None,
            "sweep.batch_size": grid.batch_size if grid else None,
            "sweep.fan_out": grid.fan_out if grid else None,
            "sweep.rank_by": spec.rank_by,
        }
        return self.start_parent(
            spec.name,
            f"{spec.name} sweep",
            params,
            {"sweep": "true", "mlflow.source.name": "nllflow sweep", **tags},
            key,
        )

    def start_comparison(self, spec: ComparisonSpec, families: Sequence[str], tags: Mapping[str, str], key: str) -> str:
        data = spec.data
        params = {
            "families": list(families),
            "data.path": data.path,
            "data.column": data.column,
            "data.censored": data.censored,
            "data.weights": data.weights,
            "bootstrap": spec.bootstrap.model_dump() if spec.bootstrap else None,
        }
        return self.start_parent(
            spec.name,
            f"{spec.name} comparison",
            params,
            {"comparison": "true", "mlflow.source.name": "nllflow compare", **tags},
            key,
        )

    def start_parent(
        self, experiment: str, run_name: str, params: Mapping[str, Any], tags: Mapping[str, str], key: str
    ) -> str:
        """A parent run (a sweep, a comparison) with its settings as JSON params; children name it
        in their `mlflow.parentRunId` tag."""

        run_id = self.run_for(experiment, key, run_name, {"spec": experiment, **tags}).info.run_id
        self._log_new_params(run_id, {k: json.dumps(v) for k, v in params.items() if v})
        return run_id

    def _log_new_params(self, run_id: str, params: Mapping[str, str]) -> None:
        """The params the run does not have yet (a retry's first attempt may have logged some)."""
        from mlflow.entities import Param

        existing = self.client.get_run(run_id).data.params
        missing = [Param(k, v) for k, v in params.items() if k not in existing]
        if missing:
            self.client.log_batch(run_id, params=missing)

    def fail_run(self, run_id: str, reason: str) -> None:
        """Close a run that its flow could not finish (FAILED, with the reason)."""
        self.client.set_tag(run_id, "reason", reason)
        self.client.set_terminated(run_id, "FAILED")

    def close_abandoned_runs(self) -> list:
        """Mark KILLED, with a reason, every run left RUNNING by a process of this host that no
        longer exists (killed with SIGKILL, out of memory, a power cut); returns those runs. Runs of
        live processes, of other hosts and runs nllflow did not create are left alone."""
        import socket

        host = socket.gethostname()
        experiments, page = [], self.client.search_experiments()
        while True:
            experiments += [experiment.experiment_id for experiment in page]
            if not page.token:
                break
            page = self.client.search_experiments(page_token=page.token)
        if not experiments:
            return []
        running = self.client.search_runs(
            experiments,
            filter_string=f"attributes.status = 'RUNNING' and tags.`{HOST_TAG}` = '{host}'",
            max_results=10000,
        )
        abandoned = [run for run in running if not process_exists(int(run.data.tags[PID_TAG]))]
        for run in abandoned:
            pid = run.data.tags[PID_TAG]
            self.client.set_tag(
                run.info.run_id,
                "reason",
                f"abandoned: process {pid} on {host} ended while the run was RUNNING; closed by process {os.getpid()}",
            )
            self.client.set_terminated(run.info.run_id, "KILLED")
        return abandoned

    def children(self, parent_run_id: str) -> list:
        """The parent's child runs, one per configuration (its idempotency key)."""
        parent = self.client.get_run(parent_run_id)
        runs = self.client.search_runs(
            [parent.info.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}'", max_results=10000
        )
        unique: dict[str, Any] = {}
        for run in runs:
            unique.setdefault(run.data.tags.get(KEY_TAG, run.info.run_id), run)
        return list(unique.values())

    def finish_sweep(
        self,
        parent_run_id: str,
        missing: Mapping[str, str] | None = None,
        *,
        rank_by: str = "nll",
        sort_by: str = "run_name",
        table_name: str = "sweep.parquet",
    ) -> SweepSummary:
        """Gather the children from the store: the table `table_name` (sorted by `sort_by`, with each
        finished child's `rank` by the metric `rank_by`, lowest first), the loss overlay, the final
        NLL against each swept hyperparameter, the `best_run` tag. `missing` names configurations
        that may have left no run (with why); those without a run of their own are listed too."""
        from mlflow.entities import Metric

        from nllflow.evaluation import plots

        rows, curves, colours_set = [], {}, {}
        missing = missing or {}
        for child in self.children(parent_run_id):
            name = child.info.run_name
            colours_set[child.info.run_id] = child.data.tags.get(COLOUR_TAG)
            metrics, params = child.data.metrics, child.data.params
            status, reason = child.info.status, child.data.tags.get("reason", "")
            if status == "RUNNING" and name in missing:
                # its flow run crashed, was killed or cancelled while it recorded: close what it left
                status, reason = "FAILED", missing[name]
                self.fail_run(child.info.run_id, reason)
            row = {
                "run_name": name,
                "run_id": child.info.run_id,
                "status": status,
                "family": params.get("family"),
                "optimizer": params.get("optimizer"),
                # a configuration that failed before its fit records the spec's lr, possibly None
                "lr": float(params["lr"]) if params.get("lr", "None") != "None" else math.nan,
                "seed": params.get("data.seed"),
                "hidden": params.get("network.hidden"),
                "weight_decay": float(params["training.weight_decay"]) if "training.weight_decay" in params else None,
                "batch_size": params.get("training.batch_size"),
                "nll": metrics.get("nll", math.nan),
                "aic": metrics.get("aic", math.nan),
                "bic": metrics.get("bic", math.nan),
                "steps": metrics.get("steps", math.nan),
                "converged": child.data.tags.get("converged") == "true",
                "reason": reason,
            }
            row.update(
                {k: v for k, v in metrics.items() if k.startswith(("estimate.", "gof_", "validation_", "test_"))}
            )
            rows.append(row)
            history = self.client.get_metric_history(child.info.run_id, "nll")
            if len(history) > 1:
                curves[name] = pd.DataFrame({"step": [m.step for m in history], "value": [m.value for m in history]})
        recorded = {row["run_name"] for row in rows}
        for name, reason in missing.items():
            if name in recorded:  # a diverged fit recorded its own FAILED run
                continue
            rows.append(
                {
                    "run_name": name,
                    "run_id": None,
                    "status": "FAILED",
                    "nll": math.nan,
                    "aic": math.nan,
                    "bic": math.nan,
                    "reason": reason,
                    "converged": False,
                }
            )
        table = pd.DataFrame(rows)
        if len(table):
            finished = (table["status"] == "FINISHED") & table[rank_by].notna()
            table["rank"] = table[rank_by].where(finished).rank(method="min")
            table = table.sort_values(list(dict.fromkeys([sort_by, "run_name"])), ignore_index=True, na_position="last")
        succeeded = table[table["rank"].notna()] if len(table) else table
        best = succeeded.loc[succeeded[rank_by].idxmin()] if len(succeeded) else None
        failed = {r.run_name: r.reason for r in table.itertuples() if r.status != "FINISHED"} if len(table) else {}
        colours = self._colour_children(table, colours_set)
        with tempfile.TemporaryDirectory() as folder:
            table.to_parquet(Path(folder) / table_name, index=False)
            self.client.log_artifacts(parent_run_id, folder)

        def figures() -> dict[str, Any]:
            drawn = {}
            with plots.LOCK:
                if curves:
                    drawn["loss_overlay.png"] = plots.loss_overlay(curves, "NLL per configuration", colours)
                if len(succeeded) > 1 and succeeded["lr"].nunique() > 1:
                    drawn["hyperparameters.png"] = plots.hyperparameter_chart(succeeded, rank_by)
            return drawn

        self._record_figures(parent_run_id, figures, folder="")
        stamp = int(self.client.get_run(parent_run_id).info.start_time)
        summary_metrics = [
            Metric("configurations", float(len(table)), stamp, 0),
            Metric("failed", float(len(failed)), stamp, 0),
        ]
        if best is not None:
            self.client.set_tag(parent_run_id, "best_run", best["run_id"])
            self.client.set_tag(parent_run_id, "best_run_name", best["run_name"])
            summary_metrics.append(Metric(f"best_{rank_by}", float(best[rank_by]), stamp, 0))
        self._log_metrics(parent_run_id, summary_metrics)
        self.client.set_tag(parent_run_id, "mlflow.note.content", sweep_description(table, rank_by))
        self.client.set_terminated(parent_run_id, "FINISHED")
        return SweepSummary(parent_run_id, table, None if best is None else best["run_id"], failed)

    def _colour_children(self, table: pd.DataFrame, colours_set: Mapping[str, str | None]) -> dict[str, str]:
        """Each recorded child's colour, in the order of its learning rate (then name), set as the
        tag MLflow's charts draw it in where it is not already: {run name: colour}."""
        from nllflow.evaluation import plots

        recorded = table[table["run_id"].notna()] if len(table) else table
        if not len(recorded):
            return {}
        recorded = recorded.sort_values(["lr", "run_name"], na_position="last", kind="stable")
        colours = plots.configuration_colours(list(recorded["run_name"]))
        for run_id, name in zip(recorded["run_id"], recorded["run_name"], strict=True):
            if colours_set.get(run_id) != colours[name]:
                self.client.set_tag(run_id, COLOUR_TAG, colours[name])
        return colours

    def finish_comparison(self, parent_run_id: str, missing: Mapping[str, str], sample: Sample) -> SweepSummary:
        """The ranking by AIC (`comparison.parquet`, the `best_run` tag), the AIC per family
        (`hyperparameters.png`: the family is the swept axis) and the four diagnostic plots with
        every fitted family overlaid, drawn from the estimates in the store."""
        from nllflow.evaluation import plots

        summary = self.finish_sweep(
            parent_run_id, missing, rank_by="aic", sort_by="aic", table_name="comparison.parquet"
        )
        ranked = summary.table[summary.table["rank"].notna()] if len(summary.table) else summary.table
        if len(ranked) > 1:
            self.log_figures(parent_run_id, {"hyperparameters.png": plots.family_chart(ranked)}, folder="")
        curves = []
        for row in summary.table.to_dict(orient="records"):
            if row["status"] == "FINISHED":
                family = get_family(row["family"])
                estimates = {
                    k.removeprefix("estimate."): v for k, v in row.items() if k.startswith("estimate.") and v == v
                }
                if any(":" in label for label in estimates):
                    continue  # a regression's: one distribution per row, no single curve to overlay
                curves.append(plots.Curve(row["run_name"], family, unflatten(family, estimates)))
        if curves:
            with plots.LOCK:
                self.log_figures(parent_run_id, plots.diagnostic_plots(sample, curves, "families compared"))
        return summary

    def _record_figures(self, run_id: str, draw: Callable[[], Mapping[str, Any]], folder: str = "plots") -> None:
        """The figures `draw` returns, logged now or, where the command defers them, once it has
        answered (nllflow.tracking.deferred)."""
        if not deferred.deferring():
            self.log_figures(run_id, draw(), folder)
            return

        def job() -> None:
            self.log_figures(run_id, draw(), folder)
            self.client.delete_tag(run_id, PLOTS_PENDING_TAG)

        self.client.set_tag(run_id, PLOTS_PENDING_TAG, "true")
        deferred.later(job)

    def log_figures(self, run_id: str, figures: Mapping[str, Any], folder: str = "plots") -> None:
        """Matplotlib figures as PNG artifacts under `folder` (the figures are closed)."""
        from nllflow.evaluation import plots

        with tempfile.TemporaryDirectory() as temporary:
            plots.save_figures(Path(temporary) / folder, figures)
            self.client.log_artifacts(run_id, temporary)

    def download_plots(self, run_id: str, destination: Path) -> list[Path]:
        """The run's `plots/` artifacts, copied into `destination`; the files written (none for a
        run that has no plots, such as a failed fit)."""
        if not self.client.list_artifacts(run_id, "plots"):
            return []
        destination.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as temporary:
            local = Path(self.client.download_artifacts(run_id, "plots", temporary))
            written = []
            for source in sorted(local.glob("*.png")):
                target = destination / source.name
                target.write_bytes(source.read_bytes())
                written.append(target)
        return written

    def _log_metrics(self, run_id: str, metrics: list) -> None:
        if _insert_metrics(self.client._tracking_client.store, run_id, metrics):
            return
        for start in range(0, len(metrics), MAX_METRICS_PER_BATCH):
            self.client.log_batch(run_id, metrics=metrics[start : start + MAX_METRICS_PER_BATCH])

    def _log_dataset(self, run_id: str, data: SplitSample) -> None:
        """The data as an MLflow dataset input (name, the fingerprint as digest, the source), so the
        runs table's Dataset column and dataset filters work."""
        from mlflow.entities import Dataset, DatasetInput, InputTag
        from mlflow.exceptions import MlflowException

        sample = data.full
        dataset = Dataset(
            name=sample.name,
            digest=sample.fingerprint,
            source_type="local" if sample.path else "code",
            source=json.dumps(_dataset_source(sample)),
            profile=json.dumps({"num_rows": sample.n}),
        )
        inputs = [DatasetInput(dataset, tags=[InputTag("mlflow.data.context", "training")])]
        with _DATASETS_LOCK:
            try:
                self.client.log_inputs(run_id, datasets=inputs)
            except MlflowException as error:
                # MLflow inserts a dataset new to the experiment without a lock: when another
                # process's child inserted the same one first, the second attempt finds it
                if "UNIQUE" not in str(error) and "unique" not in str(error).lower():
                    raise
                self.client.log_inputs(run_id, datasets=inputs)


def _recency(row: Mapping[str, Any]) -> tuple:
    """The order in which MLflow's latest value of a metric is the greatest."""
    return row["step"], row["timestamp"], row["value"]


def _insert_metrics(store: Any, run_id: str, metrics: list) -> bool:
    """Metric points straight into the metrics table of a SQLite or PostgreSQL store (MLflow's
    database schema, pinned with MLflow), the latest value per key through the store's own update;
    False for any other store, which takes `log_batch`. MLflow's `log_batch` builds an ORM object
    per point: a 1000-step trace (7000 points) took 1.5-2 s, this takes a tenth of that. As
    `log_batch` does, a point already recorded (a retried task's) is skipped, not duplicated, and
    a deleted run is refused."""
    # (an MLflow server's client has no engine: importing the SQL store would cost it a second or two)
    engine = getattr(store, "engine", None)
    sql = engine is not None and hasattr(store, "_update_latest_metrics_if_necessary")
    dialect = engine.dialect.name if sql else None
    if dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    elif dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        return False
    from mlflow.store.tracking.dbmodels.models import SqlMetric
    from mlflow.utils.validation import _validate_metric

    rows: dict[tuple, dict[str, Any]] = {}
    latest: dict[str, dict[str, Any]] = {}
    for metric in metrics:
        is_nan, value = store.sanitize_metric_value(metric.value)
        row = {
            "run_uuid": run_id,
            "key": metric.key,
            "value": value,
            "timestamp": metric.timestamp,
            "step": metric.step,
            "is_nan": is_nan,
        }
        rows.setdefault((metric.key, metric.timestamp, metric.step, value, is_nan), row)
        newest = latest.get(metric.key)
        if newest is None:
            _validate_metric(metric.key, metric.value, metric.timestamp, metric.step)
        if newest is None or _recency(row) > _recency(newest):
            latest[metric.key] = row
    statement = insert(SqlMetric.__table__).on_conflict_do_nothing()
    records = list(rows.values())
    with store.ManagedSessionMaker(read_only=False) as session:
        store._check_run_is_active(store._get_run(run_uuid=run_id, session=session))
        for start in range(0, len(records), MAX_METRIC_ROWS_PER_INSERT):
            session.execute(statement, records[start : start + MAX_METRIC_ROWS_PER_INSERT])
        store._update_latest_metrics_if_necessary([SqlMetric(**row) for row in latest.values()], session)
        session.commit()
    return True


def _dataset_source(sample: Sample) -> dict[str, str]:
    """Where a sample came from, as MLflow's dataset source: a file, a simulation, or the Python
    API's memory."""
    if sample.path:
        return {"uri": sample.path}
    return {"simulation": sample.source} if sample.truth is not None else {"memory": sample.source}


def _param(value: Any) -> str:
    return str(value)[:6000]


def _trace_metrics(result: FitResult, started_ms: int) -> list:
    """Every trace column as a metric history with one point per step, so the UI's charts and
    `trace.parquet` tell the same story; timestamps from the fit's own clock (the same on a retry)."""
    from mlflow.entities import Metric

    trace = result.trace
    columns = [c for c in trace.columns if c not in ("step", "lr")]
    steps = trace["step"].to_numpy().tolist()
    times = result.step_times if len(result.step_times) == len(steps) else [0.0] * len(steps)
    stamps = [started_ms + int(round(t * 1000)) for t in times]
    metrics = []
    for column in columns:
        values = trace[column].to_numpy(dtype=float).tolist()
        key = metric_name(column)
        metrics.extend(Metric(key, v, stamp, s) for s, v, stamp in zip(steps, values, stamps, strict=True))
    return metrics


def metric_name(label: str) -> str:
    """A trace column or estimate label as an MLflow metric name, which allows letters, digits and
    `_-. :/` only (a coefficient `mean:C(loc)[T.2]` becomes `mean:C_loc_T.2`)."""
    return re.sub(r"_+", "_", re.sub(r"[^\w\-. :/]", "_", label)).strip("_") or "_"


def _summary_metrics(result: FitResult, evaluation: Evaluation | None, data: SplitSample, started_ms: int) -> list:
    """The fit's summary (evaluation, estimates, steps) as single points at step 0, apart from the
    per-step histories (whose names the evaluation's `nll` and `mean_nll` share: those are final)."""
    from mlflow.entities import Metric

    final: dict[str, float] = {}
    if evaluation is not None:
        final = {k: v for k, v in evaluation.metrics().items() if k not in result.trace.columns}
    final.update(converged=float(result.converged), steps=float(result.steps), n=float(data.train.n))
    final.update({f"estimate.{k}": v for k, v in result.params.items()})
    final.update(
        {f"estimate.{name}:{term}": v for name, terms in result.coefficients.items() for term, v in terms.items()}
    )
    stamp = started_ms + int(round((result.step_times[-1] if result.step_times else 0.0) * 1000))
    return [Metric(metric_name(k), float(v) if v is not None else math.nan, stamp, 0) for k, v in final.items()]


def _spec_params(spec: ExperimentSpec) -> dict[str, Any]:
    optimizer = spec.optimizer
    params: dict[str, Any] = {
        "spec": spec.name,
        "family": spec.family,
        "optimizer": optimizer.name,
        "lr": optimizer.lr,
        "max_steps": optimizer.max_steps,
        "dtype": spec.dtype,
        "holdout": spec.data.holdout,
    }
    if spec.data.simulate is not None:
        params.update({"data.seed": spec.data.simulate.seed, "data.simulated_family": spec.simulation_family})
    params.update({f"fix.{k}": v for k, v in spec.fix.items()})
    params.update({f"init.{k}": v for k, v in spec.init.items()})
    params.update({f"formula.{k}": v for k, v in spec.formulas.items()})
    params.update({f"link.{k}": v for k, v in spec.links.items()})
    if spec.data.test_path is not None:
        params["data.test_path"] = spec.data.test_path
    if spec.network is not None:
        params.update({f"network.{k}": v for k, v in spec.network.model_dump().items()})
        params.update({f"training.{k}": v for k, v in spec.training.model_dump().items()})
    return params


def _fit_params(spec: ExperimentSpec, data: SplitSample, problem: FitProblem) -> dict[str, Any]:
    params = _spec_params(spec)
    params.update(
        {
            "lr": result_lr(spec, problem),
            "device": problem.device,
            "dtype": problem.dtype,
            "n": data.train.n,
            "data.source": data.full.source[:500],
            "data.fingerprint": data.full.fingerprint,
        }
    )
    params.update({f"data.{k}": v for k, v in data.full.summary().items() if k != "n"})
    if data.validation is not None:
        params["n_validation"] = data.validation.n
    if data.test is not None:
        params["n_test"] = data.test.n
    return params


def result_lr(spec: ExperimentSpec, problem: FitProblem) -> float:
    """The learning rate a fit used: the spec's, or its optimiser's default (a network's own)."""
    if problem.training is not None:
        from nllflow.fitting.network import network_lr

        return network_lr(problem.settings)
    return problem.settings.learning_rate


def _number(value: float | None, digits: int = 6) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{value:.{digits}g}"


def fit_description(spec: ExperimentSpec, result: FitResult, evaluation: Evaluation | None) -> str:
    """The run's description in MLflow (Markdown): the verdict and the table of estimates."""
    verdict = "converged" if result.converged else "**not converged**"
    lines = [
        f"**{result.family}** fit by {result.optimizer} (lr {result.lr:g}): {verdict} — {result.reason}, "
        f"{result.steps} steps.",
        "",
        "| parameter | estimate | SE | 95% CI |",
        "| --- | ---: | ---: | --- |",
    ]
    for label, value in result.params.items():
        if label in result.fixed:
            lines.append(f"| {label} | {_number(value)} | (fixed) | |")
            continue
        se = evaluation.stderr.get(label) if evaluation else None
        low, high = evaluation.ci95.get(label, (None, None)) if evaluation else (None, None)
        interval = f"[{_number(low)}, {_number(high)}]" if low is not None and math.isfinite(low) else "–"
        lines.append(f"| {label} | {_number(value)} | {_number(se)} | {interval} |")
    lines.append("")
    if evaluation is not None:
        lines.append(
            f"NLL {_number(result.nll, 10)} · AIC {_number(evaluation.aic, 8)} · BIC {_number(evaluation.bic, 8)}"
            f" · n {evaluation.n}"
        )
    return "\n".join(lines)


def sweep_description(table: pd.DataFrame, rank_by: str) -> str:
    """The parent's description (Markdown): the children ranked by `rank_by`."""
    lines = [
        f"{len(table)} configurations, ranked by {rank_by} (lowest first).",
        "",
        f"| rank | configuration | status | {rank_by} | steps |",
        "| ---: | --- | --- | ---: | ---: |",
    ]
    for row in table.sort_values(["rank", "run_name"], na_position="last").itertuples():
        rank = "–" if not isinstance(row.rank, float) or not math.isfinite(row.rank) else f"{int(row.rank)}"
        steps = getattr(row, "steps", math.nan)
        lines.append(
            f"| {rank} | {row.run_name} | {row.status} | {_number(getattr(row, rank_by), 10)} | "
            f"{_number(steps if isinstance(steps, float) else math.nan)} |"
        )
    return "\n".join(lines)


def _write_fit_artifacts(
    folder: Path,
    spec: ExperimentSpec,
    data: SplitSample,
    problem: FitProblem,
    result: FitResult,
    evaluation: Evaluation | None,
) -> None:
    """Every artifact of a fit but its figures (`Tracker._record_figures`)."""
    trace = result.trace
    if len(result.step_times) == len(trace):
        trace = trace.assign(time=result.step_times)
    trace.to_parquet(folder / "trace.parquet", index=False)
    fit_table(result, evaluation, data.full.truth).to_parquet(folder / "fit.parquet", index=False)
    (folder / "spec.yaml").write_text(yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False))
    if evaluation is not None:
        boot = evaluation.bootstrap
        fields = {**evaluation.__dict__, "bootstrap": boot.summary() if boot is not None else None}
        fields.pop("residuals")
        (folder / "evaluation.json").write_text(json.dumps(jsonable(fields), indent=2))
        if boot is not None:
            boot.estimates.to_parquet(folder / "bootstrap.parquet", index=False)
        if evaluation.residuals is not None:
            pd.DataFrame({"residual": evaluation.residuals}).to_parquet(folder / "residuals.parquet", index=False)
    if result.model is not None and not result.diverged:
        from nllflow.models.prediction import FittedModel
        from nllflow.tracking.models import ARTIFACT_PATH, save_pyfunc

        save_pyfunc(FittedModel.of(result, spec.data.column or ""), data.train.covariates, folder / ARTIFACT_PATH)
