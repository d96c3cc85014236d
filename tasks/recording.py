"""MLflow recording: the one module that talks to MLflow.

Every fit becomes a run with its parameters, the per-step trace as metric histories (logged in
batches) and as `trace.parquet`, the fit table `fit.parquet`, final metrics and plots. A sweep is a
parent run whose children carry `mlflow.parentRunId` explicitly (MLflow's active run is
thread-local, so nothing here relies on it); the parent gathers its children from the tracking
store, so it works the same whether they ran in threads or on other workers.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping

import pandas as pd
import yaml
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from tasks.evaluation import Evaluation, jsonable
from tasks.experiment import FitProblem, SplitSample
from tasks.fitting import FitResult
from tasks.spec import ExperimentSpec

MAX_METRICS_PER_BATCH = 1000
PROJECT_ROOT = Path(__file__).resolve().parents[1]
PARENT_TAG = "mlflow.parentRunId"


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
        self.client = MlflowClient(self.uri)

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
        all_tags = {**_provenance_tags(), "spec": spec.name, **tags}
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
        run_id = self._create_run(spec, f"{spec.name} sweep", {"sweep": "true", **(tags or {})}, None)
        grid = spec.sweep
        params = {
            "family": spec.family,
            "configurations": len(spec.configurations()),
            "sweep.lr": grid.lr if grid else None,
            "sweep.optimizer": grid.optimizer if grid else None,
            "sweep.seed": grid.seed if grid else None,
            "sweep.fan_out": grid.fan_out if grid else None,
        }
        self.client.log_batch(run_id, params=[Param(k, json.dumps(v)) for k, v in params.items() if v])
        return run_id

    def children(self, parent_run_id: str) -> list:
        parent = self.client.get_run(parent_run_id)
        return self.client.search_runs(
            [parent.info.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}'", max_results=10000
        )

    def finish_sweep(self, parent_run_id: str, missing: Mapping[str, str] | None = None) -> SweepSummary:
        """Gather the children from the store: `sweep.parquet`, the loss overlay, the `best_run`
        tag. `missing` names configurations that may have left no run (with why); those without a
        run of their own are listed too."""
        from tasks import plots

        rows, curves = [], {}
        for child in self.children(parent_run_id):
            name = child.info.run_name
            metrics, params = child.data.metrics, child.data.params
            row = {
                "run_name": name,
                "run_id": child.info.run_id,
                "status": child.info.status,
                "optimizer": params.get("optimizer"),
                "lr": float(params["lr"]) if "lr" in params else math.nan,
                "seed": params.get("data.seed"),
                "nll": metrics.get("nll", math.nan),
                "steps": metrics.get("steps", math.nan),
                "converged": child.data.tags.get("converged") == "true",
                "reason": child.data.tags.get("reason", ""),
            }
            row.update({k: v for k, v in metrics.items() if k.startswith("estimate.")})
            rows.append(row)
            history = self.client.get_metric_history(child.info.run_id, "nll")
            if history:
                curves[name] = pd.DataFrame({"step": [m.step for m in history], "value": [m.value for m in history]})
        recorded = {row["run_name"] for row in rows}
        for name, reason in (missing or {}).items():
            if name in recorded:  # a diverged fit recorded its own FAILED run
                continue
            rows.append({"run_name": name, "run_id": None, "status": "FAILED", "reason": reason, "converged": False})
        table = pd.DataFrame(rows).sort_values("run_name", ignore_index=True) if rows else pd.DataFrame()
        succeeded = table[(table["status"] == "FINISHED") & table["nll"].notna()] if len(table) else table
        best = succeeded.loc[succeeded["nll"].idxmin()] if len(succeeded) else None
        failed = {r.run_name: r.reason for r in table.itertuples() if r.status != "FINISHED"} if len(table) else {}
        with tempfile.TemporaryDirectory() as folder:
            table.to_parquet(Path(folder) / "sweep.parquet", index=False)
            if curves:
                figure = plots.loss_overlay(curves, "NLL per configuration")
                figure.savefig(Path(folder) / "loss_overlay.png", dpi=110)
                plots.plt.close(figure)
            self.client.log_artifacts(parent_run_id, folder)
        now = int(time.time() * 1000)
        summary_metrics = [Metric("configurations", float(len(table)), now, 0), Metric("failed", float(len(failed)), now, 0)]
        if best is not None:
            self.client.set_tag(parent_run_id, "best_run", best["run_id"])
            self.client.set_tag(parent_run_id, "best_run_name", best["run_name"])
            summary_metrics.append(Metric("best_nll", float(best["nll"]), now, 0))
        self._log_metrics(parent_run_id, summary_metrics)
        self.client.set_terminated(parent_run_id, "FINISHED")
        return SweepSummary(parent_run_id, table, None if best is None else best["run_id"], failed)

    def _log_metrics(self, run_id: str, metrics: list[Metric]) -> None:
        for start in range(0, len(metrics), MAX_METRICS_PER_BATCH):
            self.client.log_batch(run_id, metrics=metrics[start : start + MAX_METRICS_PER_BATCH])


def _finite_or_nan(value: float) -> float:
    return float(value) if value is not None else math.nan


def _trace_metrics(trace: pd.DataFrame) -> list[Metric]:
    """Every trace column as a metric history, one point per step."""
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
    """One row per parameter: estimate, SE, 95% CI, whether fixed, truth when known."""
    rows = []
    for label, estimate in result.params.items():
        se = evaluation.stderr.get(label, math.nan) if evaluation else math.nan
        low, high = evaluation.ci95.get(label, (math.nan, math.nan)) if evaluation else (math.nan, math.nan)
        rows.append(
            {"parameter": label, "estimate": estimate, "stderr": se, "ci95_low": low, "ci95_high": high,
             "fixed": label in result.fixed, "truth": (truth or {}).get(label, math.nan)}
        )
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
        (folder / "evaluation.json").write_text(json.dumps(jsonable(evaluation.__dict__), indent=2))
    plot_folder = folder / "plots"
    plot_folder.mkdir()
    values = data.train.values
    title = spec.label()
    figures = {"loss.png": plots.loss_curve(result.trace, f"{title}: NLL per step")}
    if not result.diverged:
        figures["density.png"] = plots.fitted_density(problem.family, values, result.natural, title)
        if not problem.family.discrete and problem.family.scipy is not None:
            figures["qq.png"] = plots.qq_plot(problem.family, values, result.params, title)
    for name, figure in figures.items():
        figure.savefig(plot_folder / name, dpi=110)
        plots.plt.close(figure)



