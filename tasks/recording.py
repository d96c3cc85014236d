"""MLflow recording: the one module that talks to MLflow.

Every fit becomes a run with its parameters, the per-step trace as metric histories (logged in
batches) and as `trace.parquet`, the fit table `fit.parquet`, final metrics and plots. A sweep is a
parent run whose children carry `mlflow.parentRunId` explicitly (MLflow's active run is
thread-local, so nothing here relies on it); the parent gathers its children from the tracking
store, so it works the same whether they ran in threads or on other workers.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import re
import socket
import subprocess
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd
import yaml
from mlflow.entities import Metric, Param, Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from sqlalchemy.engine import make_url

from tasks.evaluation import Evaluation, jsonable
from tasks.experiment import FitProblem, SplitSample
from tasks.data import Sample
from tasks.families import get_family
from tasks.fitting import FitResult, unflatten
from tasks.spec import ComparisonSpec, ExperimentSpec

MAX_METRICS_PER_BATCH = 1000
PROJECT_ROOT = Path(__file__).resolve().parents[1]
PARENT_TAG = "mlflow.parentRunId"
# the process that created a run: a run still RUNNING after that process ended was abandoned
HOST_TAG, PID_TAG = "nllflow.host", "nllflow.pid"
# the reachability check before a flow starts: MLflow's defaults (7 retries, 120 s timeout) make an
# unreachable server look like a hang of several minutes
CHECK_RETRIES, CHECK_TIMEOUT_SECONDS = "1", "5"


class TrackingUnavailable(RuntimeError):
    """The MLflow tracking server does not answer (exit code 1 in the CLI: retry when it is up)."""


def nllflow_home() -> Path:
    """Where the embedded tracking store lives: $NLLFLOW_HOME, else ~/.local/share/nllflow."""
    configured = os.environ.get("NLLFLOW_HOME")
    home = Path(configured) if configured else Path.home() / ".local" / "share" / "nllflow"
    return home.expanduser().resolve()


def tracking_uri() -> str:
    """$MLFLOW_TRACKING_URI, else a SQLite store in nllflow's home (never a stray ./mlflow.db)."""
    configured = os.environ.get("MLFLOW_TRACKING_URI")
    if configured:
        return configured
    home = nllflow_home()
    home.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{home / 'mlflow.db'}"


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a SQLite tracking URI (None for other stores and in-memory SQLite)."""
    if not uri.startswith("sqlite:"):
        return None
    database = make_url(uri).database
    return Path(database).resolve() if database and database != ":memory:" else None


_opened_stores: set[str] = set()


def open_client(uri: str) -> MlflowClient:
    """An MlflowClient on `uri`. MLflow creates and migrates a SQLite store's schema when a process
    first opens it, and processes that do so at once crash each other ("table runs already exists"),
    so each process opens a SQLite store the first time under an exclusive lock on a file beside it."""
    path = _sqlite_path(uri)
    if path is None or uri in _opened_stores:
        return MlflowClient(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        client = MlflowClient(uri)
    _opened_stores.add(uri)
    return client


@contextmanager
def _bounded_http_retries():
    """Few, short HTTP retries unless the user configured MLflow's own."""
    bounded = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": CHECK_RETRIES, "MLFLOW_HTTP_REQUEST_TIMEOUT": CHECK_TIMEOUT_SECONDS}
    added = [key for key in bounded if key not in os.environ]
    os.environ.update({key: bounded[key] for key in added})
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def check_tracking(uri: str | None = None) -> None:
    """Fail fast, in one line, when a tracking server does not answer (an embedded SQLite store
    always does)."""
    uri = uri or tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return
    with _bounded_http_retries():
        try:
            MlflowClient(uri).search_experiments(max_results=1)
        except MlflowException as error:
            # MLflow's message nests the whole urllib3 error; the OS error inside it is the news
            text = str(error).strip()
            found = re.search(r"\[Errno -?\d+\][^'\")]*", text)
            cause = found.group(0).strip() if found else (text.splitlines() or [type(error).__name__])[0][:200]
            raise TrackingUnavailable(
                f"MLflow tracking server {uri} is not reachable ({cause}); start it or point "
                "MLFLOW_TRACKING_URI at a running one"
            ) from None


def process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, as another user's process
        return True
    return True


def owner_tags() -> dict[str, str]:
    return {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid())}


def ui_command(uri: str | None = None) -> str:
    uri = uri or tracking_uri()
    if uri.startswith("http"):
        return f"open {uri} in a browser"
    return f".venv/bin/mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000"


def _provenance_tags() -> dict[str, str]:
    tags = {f"version.{p}": metadata.version(p) for p in ("nllflow", "torch", "mlflow", "prefect")}
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
        """The experiment `name`, created on first use (also when two processes race to create it)."""
        existing = self.client.get_experiment_by_name(name)
        if existing is not None:
            return existing.experiment_id
        location = None
        if self.uri.startswith("sqlite:") or self.uri.startswith("file:"):
            location = (nllflow_home() / "artifacts").as_uri()
        try:
            return self.client.create_experiment(name, artifact_location=location)
        except MlflowException:
            existing = self.client.get_experiment_by_name(name)
            if existing is None:
                raise
            return existing.experiment_id

    def _create_run(self, spec: ExperimentSpec, run_name: str, tags: Mapping[str, str], parent: str | None) -> str:
        all_tags = {**_provenance_tags(), **owner_tags(), "spec": spec.name, **tags}
        if parent:
            all_tags[PARENT_TAG] = parent
        run = self.client.create_run(self.experiment_id(spec.name), run_name=run_name, tags=all_tags)
        return run.info.run_id

    def record_fit(
        self,
        spec: ExperimentSpec,
        data: SplitSample,
        problem: FitProblem,
        result: FitResult,
        evaluation: Evaluation | None,
        *,
        parent_run_id: str | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> str:
        """One run for one fit; FAILED (with the reason) when the fit diverged."""
        run_id = self._create_run(spec, spec.label(), {"reason": result.reason, **(tags or {})}, parent_run_id)
        status = "FAILED" if result.diverged else "FINISHED"
        try:
            params = _fit_params(spec, data, problem)
            trace_metrics = _trace_metrics(result.trace)
            final = {}
            if evaluation is not None:
                final = {k: v for k, v in evaluation.metrics().items() if k not in result.trace.columns}
            final.update(converged=float(result.converged), steps=float(result.steps), n=float(data.train.n))
            final.update({f"estimate.{k}": v for k, v in result.params.items()})
            now = int(time.time() * 1000)
            final_metrics = [Metric(k, _finite_or_nan(v), now, result.steps) for k, v in final.items()]
            self._log_metrics(run_id, trace_metrics + final_metrics)
            self.client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()])
            self.client.set_tag(run_id, "converged", str(result.converged).lower())
            with tempfile.TemporaryDirectory() as folder:
                _write_fit_artifacts(Path(folder), spec, data, problem, result, evaluation)
                self.client.log_artifacts(run_id, folder)
        except BaseException:
            self.client.set_terminated(run_id, "FAILED")
            raise
        self.client.set_terminated(run_id, status)
        return run_id

    def record_failure(self, spec: ExperimentSpec, reason: str, *, parent_run_id: str | None = None) -> str:
        """A run for a configuration that could not be fitted at all (its reason, no results)."""
        run_id = self._create_run(spec, spec.label(), {"reason": reason}, parent_run_id)
        self.client.log_batch(run_id, params=[Param(k, str(v)) for k, v in _spec_params(spec).items()])
        self.client.set_terminated(run_id, "FAILED")
        return run_id

    def start_sweep(self, spec: ExperimentSpec, tags: Mapping[str, str] | None = None) -> str:
        grid = spec.sweep
        params = {
            "family": spec.family,
            "configurations": len(spec.configurations()),
            "sweep.lr": grid.lr if grid else None,
            "sweep.optimizer": grid.optimizer if grid else None,
            "sweep.seed": grid.seed if grid else None,
            "sweep.fan_out": grid.fan_out if grid else None,
        }
        return self.start_parent(spec, f"{spec.name} sweep", params, {"sweep": "true", **(tags or {})})

    def start_comparison(self, spec: ComparisonSpec, families: Sequence[str], tags: Mapping[str, str] | None = None) -> str:
        data = spec.data
        params = {
            "families": list(families),
            "data.path": data.path,
            "data.column": data.column,
            "data.censored": data.censored,
            "data.weights": data.weights,
            "bootstrap": spec.bootstrap.model_dump() if spec.bootstrap else None,
        }
        return self.start_parent(spec, f"{spec.name} comparison", params, {"comparison": "true", **(tags or {})})

    def start_parent(
        self, spec: ExperimentSpec | ComparisonSpec, run_name: str, params: Mapping[str, Any], tags: Mapping[str, str]
    ) -> str:
        """A parent run (a sweep, a comparison) with its settings as JSON params; children name it
        in their `mlflow.parentRunId` tag."""
        run_id = self._create_run(spec, run_name, tags, None)
        self.client.log_batch(run_id, params=[Param(k, json.dumps(v)) for k, v in params.items() if v])
        return run_id

    def fail_run(self, run_id: str, reason: str) -> None:
        """Close a run that its flow could not finish (FAILED, with the reason)."""
        self.client.set_tag(run_id, "reason", reason)
        self.client.set_terminated(run_id, "FAILED")

    def close_abandoned_runs(self) -> list[Run]:
        """Mark KILLED, with a reason, every run left RUNNING by a process of this host that no
        longer exists (killed with SIGKILL, out of memory, a power cut); returns those runs. Runs of
        live processes, of other hosts and runs nllflow did not create are left alone."""
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
            experiments, filter_string=f"attributes.status = 'RUNNING' and tags.`{HOST_TAG}` = '{host}'",
            max_results=10000,
        )
        abandoned = [run for run in running if not process_exists(int(run.data.tags[PID_TAG]))]
        for run in abandoned:
            pid = run.data.tags[PID_TAG]
            self.client.set_tag(run.info.run_id, "reason", f"abandoned: process {pid} on {host} ended while the "
                                f"run was RUNNING; closed by process {os.getpid()}")
            self.client.set_terminated(run.info.run_id, "KILLED")
        return abandoned

    def children(self, parent_run_id: str) -> list:
        parent = self.client.get_run(parent_run_id)
        return self.client.search_runs(
            [parent.info.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}'", max_results=10000
        )

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
        finished child's `rank` by the metric `rank_by`, lowest first), the loss overlay, the
        `best_run` tag. `missing` names configurations that may have left no run (with why); those
        without a run of their own are listed too."""
        from tasks import plots

        rows, curves = [], {}
        for child in self.children(parent_run_id):
            name = child.info.run_name
            metrics, params = child.data.metrics, child.data.params
            row = {
                "run_name": name,
                "run_id": child.info.run_id,
                "status": child.info.status,
                "family": params.get("family"),
                "optimizer": params.get("optimizer"),
                # a configuration that failed before its fit records the spec's lr, possibly None
                "lr": float(params["lr"]) if params.get("lr", "None") != "None" else math.nan,
                "seed": params.get("data.seed"),
                "nll": metrics.get("nll", math.nan),
                "aic": metrics.get("aic", math.nan),
                "bic": metrics.get("bic", math.nan),
                "steps": metrics.get("steps", math.nan),
                "converged": child.data.tags.get("converged") == "true",
                "reason": child.data.tags.get("reason", ""),
            }
            row.update({k: v for k, v in metrics.items() if k.startswith(("estimate.", "gof_"))})
            rows.append(row)
            history = self.client.get_metric_history(child.info.run_id, "nll")
            if history:
                curves[name] = pd.DataFrame({"step": [m.step for m in history], "value": [m.value for m in history]})
        recorded = {row["run_name"] for row in rows}
        for name, reason in (missing or {}).items():
            if name in recorded:  # a diverged fit recorded its own FAILED run
                continue
            rows.append({"run_name": name, "run_id": None, "status": "FAILED", "nll": math.nan, "aic": math.nan,
                         "bic": math.nan, "reason": reason, "converged": False})
        table = pd.DataFrame(rows)
        if len(table):
            finished = (table["status"] == "FINISHED") & table[rank_by].notna()
            table["rank"] = table[rank_by].where(finished).rank(method="min")
            table = table.sort_values(list(dict.fromkeys([sort_by, "run_name"])), ignore_index=True, na_position="last")
        succeeded = table[table["rank"].notna()] if len(table) else table
        best = succeeded.loc[succeeded[rank_by].idxmin()] if len(succeeded) else None
        failed = {r.run_name: r.reason for r in table.itertuples() if r.status != "FINISHED"} if len(table) else {}
        with tempfile.TemporaryDirectory() as folder:
            table.to_parquet(Path(folder) / table_name, index=False)
            if curves:
                with plots.LOCK:
                    _save_figures(Path(folder), {"loss_overlay.png": plots.loss_overlay(curves, "NLL per configuration")})
            self.client.log_artifacts(parent_run_id, folder)
        now = int(time.time() * 1000)
        summary_metrics = [Metric("configurations", float(len(table)), now, 0), Metric("failed", float(len(failed)), now, 0)]
        if best is not None:
            self.client.set_tag(parent_run_id, "best_run", best["run_id"])
            self.client.set_tag(parent_run_id, "best_run_name", best["run_name"])
            summary_metrics.append(Metric(f"best_{rank_by}", float(best[rank_by]), now, 0))
        self._log_metrics(parent_run_id, summary_metrics)
        self.client.set_terminated(parent_run_id, "FINISHED")
        return SweepSummary(parent_run_id, table, None if best is None else best["run_id"], failed)

    def finish_comparison(self, parent_run_id: str, missing: Mapping[str, str], sample: Sample) -> SweepSummary:
        """The ranking by AIC (`comparison.parquet`, the `best_run` tag) and the four diagnostic
        plots with every fitted family overlaid, drawn from the estimates in the store."""
        from tasks import plots

        summary = self.finish_sweep(parent_run_id, missing, rank_by="aic", sort_by="aic", table_name="comparison.parquet")
        curves = []
        for row in summary.table.to_dict(orient="records"):
            if row["status"] == "FINISHED":
                family = get_family(row["family"])
                estimates = {k.removeprefix("estimate."): v for k, v in row.items() if k.startswith("estimate.") and v == v}
                curves.append(plots.Curve(row["run_name"], family, unflatten(family, estimates)))
        if curves:
            with plots.LOCK:
                self.log_figures(parent_run_id, plots.diagnostic_plots(sample, curves, "families compared"))
        return summary

    def log_figures(self, run_id: str, figures: Mapping[str, Any], folder: str = "plots") -> None:
        """Matplotlib figures as PNG artifacts under `folder` (the figures are closed)."""
        from tasks import plots

        with tempfile.TemporaryDirectory() as temporary:
            with plots.LOCK:
                _save_figures(Path(temporary) / folder, figures)
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

    def _log_metrics(self, run_id: str, metrics: list[Metric]) -> None:
        for start in range(0, len(metrics), MAX_METRICS_PER_BATCH):
            self.client.log_batch(run_id, metrics=metrics[start : start + MAX_METRICS_PER_BATCH])


def _finite_or_nan(value: float) -> float:
    return float(value) if value is not None else math.nan


def _trace_metrics(trace: pd.DataFrame) -> list[Metric]:
    """Every trace column as a metric history with one point per step, so the UI's charts and
    `trace.parquet` tell the same story (about 0.06 ms per point in a SQLite store)."""
    now = int(time.time() * 1000)
    columns = [c for c in trace.columns if c not in ("step", "lr")]
    steps = trace["step"].to_numpy()
    metrics = []
    for column in columns:
        values = trace[column].to_numpy(dtype=float)
        metrics.extend(Metric(column, float(v), now, int(s)) for s, v in zip(steps, values))
    return metrics


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
    return params


def _fit_params(spec: ExperimentSpec, data: SplitSample, problem: FitProblem) -> dict[str, Any]:
    params = _spec_params(spec)
    params.update(
        {
            "lr": problem.settings.learning_rate,
            "device": problem.device,
            "n": data.train.n,
            "data.source": data.full.source[:500],
            "data.fingerprint": data.full.fingerprint,
        }
    )
    params.update({f"data.{k}": v for k, v in data.full.summary().items() if k != "n"})
    return params


def fit_table(result: FitResult, evaluation: Evaluation | None, truth: Mapping[str, float] | None) -> pd.DataFrame:
    """One row per parameter: estimate, SE, 95% CI, whether fixed, truth when known, and with a
    bootstrap its standard error and percentile interval."""
    rows = []
    boot = evaluation.bootstrap if evaluation is not None else None
    for label, estimate in result.params.items():
        se = evaluation.stderr.get(label, math.nan) if evaluation else math.nan
        low, high = evaluation.ci95.get(label, (math.nan, math.nan)) if evaluation else (math.nan, math.nan)
        row = {"parameter": label, "estimate": estimate, "stderr": se, "ci95_low": low, "ci95_high": high,
               "fixed": label in result.fixed, "truth": (truth or {}).get(label, math.nan)}
        if boot is not None:
            boot_low, boot_high = boot.intervals.get(label, (math.nan, math.nan))
            row.update(bootstrap_se=boot.stderr.get(label, math.nan), bootstrap_low=boot_low, bootstrap_high=boot_high)
        rows.append(row)
    return pd.DataFrame(rows)


def _write_fit_artifacts(
    folder: Path,
    spec: ExperimentSpec,
    data: SplitSample,
    problem: FitProblem,
    result: FitResult,
    evaluation: Evaluation | None,
) -> None:
    from tasks import plots

    result.trace.to_parquet(folder / "trace.parquet", index=False)
    fit_table(result, evaluation, data.full.truth).to_parquet(folder / "fit.parquet", index=False)
    (folder / "spec.yaml").write_text(yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False))
    if evaluation is not None:
        boot = evaluation.bootstrap
        fields = {**evaluation.__dict__, "bootstrap": boot.summary() if boot is not None else None}
        (folder / "evaluation.json").write_text(json.dumps(jsonable(fields), indent=2))
        if boot is not None:
            boot.estimates.to_parquet(folder / "bootstrap.parquet", index=False)
    title = spec.label()
    with plots.LOCK:
        figures = {"loss.png": plots.loss_curve(result.trace, f"{title}: NLL per step")}
        if not result.diverged:
            figures.update(plots.diagnostic_plots(data.train, [plots.Curve(title, problem.family, result.natural)], title))
        _save_figures(folder / "plots", figures)


def _save_figures(folder: Path, figures: Mapping[str, Any]) -> None:
    """Each figure as a PNG in `folder`, closed (call under plots.LOCK)."""
    from tasks import plots

    folder.mkdir(parents=True, exist_ok=True)
    for name, figure in figures.items():
        figure.savefig(folder / name, dpi=110)
        plots.plt.close(figure)



