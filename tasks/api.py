"""The Python API, for notebooks and scripts (`import nllflow`; the names are loaded on first use).

    fit = nllflow.fit(values, "gamma")   # a NumPy array, a pandas Series or DataFrame, a torch tensor or a path
    fit.params, fit.stderr, fit.ci95, fit.nll, fit.aic, fit.bic, fit.trace
    print(fit.summary())                 # the table `nllflow fit` prints
    fit.record()                         # the MLflow run `nllflow fit` records

`fit` runs the pipeline's steps in this process: no Prefect, and nothing is recorded until
`record()` (or `record=True`). `compare` and `sweep` run the Prefect flows on the local Prefect
server that nllflow reuses (`nllflow.flows.server`) and record every fit, as the CLI does; the
CLI's `run` and `compare` go through `run_sweep` and `run_comparison` here. Bad input is an
`InputError` with the CLI's one-line message.
"""

from __future__ import annotations

import math
import os
import uuid
from typing import Any, Callable, Mapping, Sequence

import pandas as pd

from nllflow.data.samples import Sample, memory_sample, write_sample
from nllflow.evaluation.summary import Evaluation, fit_summary, fit_table
from nllflow.fitting.engine import warn_unless_converged
from nllflow.fitting.mle import FitResult
from nllflow.pipeline.steps import FitProblem, SplitSample, check, read_sample, run_core
from nllflow.report import comparison_report, fit_report, sweep_report
from nllflow.spec import ComparisonSpec, ExperimentSpec, load_spec, parse_comparison, parse_spec

__all__ = ["Comparison", "Fit", "Sweep", "compare", "fit", "load_spec", "sweep"]

Data = Any  # a NumPy array (or anything array-like), a pandas Series or DataFrame, a torch tensor, a path


class Fit:
    """One fitted family: `params` (every component by label, fixed ones too), `stderr` and
    `ci95` (95 % Wald intervals; NaN where the observed information gives none, see
    `information`), `nll` (total), `aic`, `bic`, `gof`, `converged`, `reason`, `steps` and `trace`
    (a DataFrame, one row per step). `result` and `evaluation` are the core's own objects."""

    def __init__(
        self,
        spec: ExperimentSpec,
        data: SplitSample,
        problem: FitProblem,
        result: FitResult,
        evaluation: Evaluation | None,
    ):
        self.spec, self.data, self.problem, self.result, self.evaluation = spec, data, problem, result, evaluation
        # the idempotency key of this fit's run: record() twice is one run
        self._key = uuid.uuid4().hex
        self._recorded: dict[str, str] = {}

    family = property(lambda self: self.result.family)
    params = property(lambda self: dict(self.result.params))
    nll = property(lambda self: self.result.nll)
    mean_nll = property(lambda self: self.result.mean_nll)
    converged = property(lambda self: self.result.converged)
    reason = property(lambda self: self.result.reason)
    steps = property(lambda self: self.result.steps)
    trace = property(lambda self: self.result.trace)
    coefficients = property(lambda self: dict(self.result.coefficients))
    validation_mean_nll = property(lambda self: self.result.validation_mean_nll)
    test_mean_nll = property(lambda self: self.evaluation.test_mean_nll if self.evaluation else None)

    def predict(self, data: pd.DataFrame, quantiles: Sequence[float] = ()) -> pd.DataFrame:
        """A regression's or a network's predictions for the rows of `data`: each row's natural
        parameters, mean and a column `q<p>` per probability in `quantiles`."""
        from nllflow.errors import InputError
        from nllflow.models.prediction import FittedModel

        if self.result.model is None:
            raise InputError("a fit without formulas or a network predicts the same distribution for every row")
        return FittedModel.of(self.result).predict(data, list(quantiles))

    @property
    def n(self) -> int:
        return self.evaluation.n if self.evaluation is not None else self.data.train.n

    @property
    def stderr(self) -> dict[str, float]:
        return dict(self.evaluation.stderr) if self.evaluation else dict.fromkeys(self.result.free, math.nan)

    @property
    def ci95(self) -> dict[str, tuple[float, float]]:
        if self.evaluation is None:
            return dict.fromkeys(self.result.free, (math.nan, math.nan))
        return dict(self.evaluation.ci95)

    @property
    def aic(self) -> float:
        return self.evaluation.aic if self.evaluation else math.nan

    @property
    def bic(self) -> float:
        return self.evaluation.bic if self.evaluation else math.nan

    @property
    def gof(self) -> dict[str, float]:
        return dict(self.evaluation.gof) if self.evaluation else {}

    @property
    def information(self) -> str:
        return self.evaluation.information if self.evaluation else "diverged: no estimate"

    @property
    def run_id(self) -> str | None:
        """The MLflow run, once recorded."""
        return self._recorded.get("run_id")

    def to_dict(self) -> dict[str, Any]:
        """The CLI's `--json` object for this fit (non-finite numbers are None), with where it was
        recorded once it was."""
        return {**fit_summary(self.result, self.evaluation), "dropped": self.data.full.dropped, **self._recorded}

    def summary(self) -> str:
        """The table that `nllflow fit` prints for the same fit."""
        return fit_report(self.to_dict())

    def to_frame(self) -> pd.DataFrame:
        """One row per parameter: estimate, SE, 95 % CI, whether fixed, the truth of simulated
        data, the bootstrap's columns (the run's `fit.parquet`)."""
        return fit_table(self.result, self.evaluation, self.data.full.truth)

    def plot(self) -> dict:
        """The run's diagnostics as matplotlib figures, by file name: `loss.png` (NLL per step) and,
        unless the fit diverged, `density.png`, `cdf.png`, `pp.png`, `qq.png` (as the data allow)."""
        from nllflow.evaluation.plots import fit_figures

        return fit_figures(self.spec.label(), self.data.train, self.problem.family, self.result, self.evaluation)

    def record(self) -> str:
        """Log the fit to MLflow as `nllflow fit` does (experiment `experiment`, params, metric
        histories, dataset, description, artifacts, plots); its run id. Recording twice is one run."""
        from nllflow.tracking.recorder import Tracker
        from nllflow.tracking.store import check_tracking

        check_tracking()
        tracker = Tracker()
        run_id = tracker.record_fit(
            self.spec,
            self.data,
            self.problem,
            self.result,
            self.evaluation,
            key=self._key,
            tags={"mlflow.source.name": "nllflow.fit"},
        )
        self._recorded = {
            "run_id": run_id,
            "experiment": self.spec.name,
            "experiment_id": tracker.experiment_id(self.spec.name),
            "tracking_uri": tracker.uri,
        }
        return run_id

    def __repr__(self) -> str:
        estimates = ", ".join(f"{k}={v:.6g}" for k, v in self.result.params.items())
        verdict = "converged" if self.converged else "not converged"
        return f"<nllflow.Fit {self.family}({estimates}), n={self.n}, NLL {self.nll:.10g}, {verdict}>"


class Comparison:
    """Families ranked by AIC (`ranking`: one row per family with rank, AIC, ΔAIC, BIC, KS, CvM,
    AD and the estimates), the best family and the MLflow parent run; `summary()` is the table
    `nllflow compare` prints."""

    def __init__(self, spec: ComparisonSpec, summary: dict[str, Any]):
        self.spec, self._summary = spec, summary
        self.ranking = pd.DataFrame(summary["ranking"])
        self.best_family: str | None = summary["best_family"]
        self.parent_run_id: str = summary["parent_run_id"]
        self.skipped: dict[str, str] = summary["skipped"]
        self.notes: dict[str, str] = summary["notes"]

    def summary(self) -> str:
        return comparison_report(self.spec, self._summary)

    def __repr__(self) -> str:
        return f"<nllflow.Comparison of {len(self.ranking)} families, best: {self.best_family}>"


class Sweep:
    """A sweep's configurations (`table`: one row per child run with status, NLL, steps, estimates),
    the best run and the MLflow parent run; `summary()` is the table `nllflow run` prints."""

    def __init__(self, spec: ExperimentSpec, summary: dict[str, Any]):
        self.spec, self._summary = spec, summary
        self.table = pd.DataFrame(summary["runs"])
        self.parent_run_id: str = summary["parent_run_id"]
        self.best_run_id: str | None = summary["best_run_id"]
        self.failed: dict[str, str] = summary["failed"]

    def summary(self) -> str:
        return sweep_report(self.spec, self._summary)

    def __repr__(self) -> str:
        return f"<nllflow.Sweep '{self.spec.name}' of {len(self.table)} configurations>"


def fit(
    data: Data,
    family: str,
    *,
    column: str | None = None,
    weights: Any = None,
    censored: Sequence[str] | None = None,
    fix: Mapping[str, Any] | None = None,
    init: Mapping[str, Any] | None = None,
    optimizer: str | None = None,
    lr: float | None = None,
    max_steps: int = 500,
    holdout: float = 0.0,
    bootstrap: int | Mapping[str, Any] | None = None,
    device: str = "auto",
    dtype: str | None = None,
    formulas: Mapping[str, str] | None = None,
    links: Mapping[str, str] | None = None,
    network: str | Mapping[str, Any] | None = None,
    training: Mapping[str, Any] | None = None,
    test_data: Data | None = None,
    drop_missing: bool = False,
    record: bool = False,
    experiment: str = "nllflow-fit",
) -> Fit:
    """Fit `family` to `data` by maximum likelihood: `nllflow fit` as a function.

    `data`: a NumPy array (or anything array-like), a pandas Series, a torch tensor, a DataFrame
    (with `column`, or `censored=(LEFT, RIGHT)`), or a CSV/Parquet path (with `column` or
    `censored`, as `--data`). `weights`: frequency weights (a column name for a DataFrame or a
    file, else values). `bootstrap`: B refits, or {"replicates": B, "kind": ..., "seed": ...}.
    `formulas`: a regression, {parameter: "x + C(g)"} over the DataFrame's (or file's) columns, with
    `links` {parameter: link}; `coefficients` then holds the estimates.
    `network`: a network's input terms ("x + C(g)") or its spec section ({"terms": ..., "hidden":
    [64, 64], ...}), trained as `training` says ({"batch_size": 256, "validation": 0.2, ...};
    `max_steps` is the epoch budget, the optimizer Adam unless named). `test_data`: rows like
    `data`'s (a path or in memory), whose NLL is `test_mean_nll`. `predict(frame)` predicts new rows.
    A fit that did not converge warns (`ConvergenceWarning`) and says `converged=False`.
    """
    if isinstance(network, str):
        network = {"terms": network}
    read = [*(formulas or {}).values(), *([network["terms"]] if network else [])]
    sample, source = _data_section(data, column, weights, censored, read, drop_missing)
    test, test_source = None, None
    if test_data is not None:
        test, test_source = _data_section(test_data, column, weights, censored, read, drop_missing)
        if test is None and sample is None:  # two files: the spec names both
            source["test_path"], test_source = test_source["path"], None
    optimizer_section: dict[str, Any] = {"lr": lr, "max_steps": max_steps}
    if optimizer is not None:
        optimizer_section["name"] = optimizer
    raw: dict[str, Any] = {
        "name": experiment,
        "family": family,
        "data": {**source, "holdout": holdout},
        "fix": dict(fix or {}),
        "init": dict(init or {}),
        "optimizer": optimizer_section,
        "bootstrap": _bootstrap_section(bootstrap),
        "device": device,
        "dtype": dtype,
    }
    if formulas:
        raw["formulas"] = dict(formulas)
    if links:
        raw["links"] = dict(links)
    if network:
        raw["network"] = dict(network)
        raw["training"] = dict(training or {})
    spec = parse_spec(raw, source="arguments")
    if test is None and test_source is not None:  # data in memory, test rows in a file
        test = read_sample(parse_spec({**raw, "data": test_source}, source="test_data").data, family, spec.covariates)
    if test is not None and sample is None:  # data in a file, test rows in memory
        sample = read_sample(spec.data, spec.family, spec.covariates)
    split, problem, result, evaluation = run_core(spec, sample, test)
    warn_unless_converged(result.outcome, result.reason, f"{result.family} fit")
    fitted = Fit(spec, split, problem, result, evaluation)
    if record:
        fitted.record()
    return fitted


def compare(
    data: Data,
    families: str | Sequence[str],
    *,
    column: str | None = None,
    weights: Any = None,
    censored: Sequence[str] | None = None,
    optimizer: str = "lbfgs",
    max_steps: int = 500,
    bootstrap: int | Mapping[str, Any] | None = None,
    device: str = "auto",
    dtype: str = "float64",
    experiment: str = "nllflow-compare",
) -> Comparison:
    """Fit several families to one data set and rank them by AIC: `nllflow compare` as a function
    (the compare flow, recorded in MLflow). `families`: names, "a,b,c", or a group ("continuous",
    "discrete"). Data given in memory is written once to a Parquet file in nllflow's home
    (`inputs/`, named by its fingerprint), because the flow's fits read their data from a file."""
    from nllflow.tracking.store import nllflow_home

    sample, source = _data_section(data, column, weights, censored)
    if sample is not None:
        source = write_sample(sample, nllflow_home() / "inputs")
    names = [name.strip() for name in families.split(",")] if isinstance(families, str) else list(families)
    raw = {
        "name": experiment,
        "families": [name for name in names if name],
        "data": source,
        "optimizer": {"name": optimizer, "max_steps": max_steps},
        "bootstrap": _bootstrap_section(bootstrap),
        "device": device,
        "dtype": dtype,
    }
    spec = parse_comparison(raw, source="arguments")
    return Comparison(spec, run_comparison(spec))


def sweep(spec: ExperimentSpec | str | os.PathLike | Mapping[str, Any]) -> Sweep:
    """Run an experiment spec (an `ExperimentSpec`, a YAML path, or the spec as a mapping) through
    the sweep flow: one MLflow parent run with a child per configuration, as `nllflow run` does.
    Overrides: `load_spec(path, ["sweep.lr=[0.01, 0.1]"])`."""
    if isinstance(spec, (str, os.PathLike)):
        spec = load_spec(spec)
    elif isinstance(spec, Mapping):
        spec = parse_spec(dict(spec))
    return Sweep(spec, run_sweep(spec))


def preflight(spec: ExperimentSpec) -> None:
    """Everything that can be refused before a flow or a run exists: data, support, parameters,
    and an unreachable tracking server (TrackingUnavailable: exit 1 in the CLI, as it may come
    back). Then Prefect's telemetry is turned off (its writes lock SQLite)."""
    check(spec)
    _ready_for_flows()


def run_sweep(spec: ExperimentSpec) -> dict[str, Any]:
    """The sweep flow on a checked spec; its summary (what `nllflow run --json` prints)."""
    preflight(spec)

    def flow():
        from nllflow.flows.sweep import sweep

        return sweep

    return run_flow(flow, spec)


def run_comparison(spec: ComparisonSpec) -> dict[str, Any]:
    """The compare flow on a checked plan; its summary (`ranking` is what `nllflow compare --json`
    prints)."""
    from nllflow.pipeline.steps import plan_comparison

    plan_comparison(spec)
    _ready_for_flows()

    def flow():
        from nllflow.flows.compare import compare

        return compare

    return run_flow(flow, spec)


def run_flow(load: Callable[[], Callable], *args: Any, **kwargs: Any) -> Any:
    """The flow that `load()` imports, called on the Prefect server nllflow reuses
    (`nllflow.flows.server`): one started earlier, or one started now in the background, whose
    start overlaps the flow's imports."""
    from nllflow.flows.server import claim_server

    lease = claim_server()
    try:
        flow = load()
        # what every flow records with, loaded once per process while a new server starts: MLflow
        # with its store (created or migrated here) and matplotlib
        from nllflow.evaluation import plots  # noqa: F401
        from nllflow.tracking.store import open_client, tracking_uri

        open_client(tracking_uri())
    except BaseException:
        lease.close()  # the use lock, which would keep the server from its idle stop
        raise
    with lease:
        return flow(*args, **kwargs)


def _ready_for_flows() -> None:
    from nllflow.tracking.store import check_tracking

    check_tracking()
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def _data_section(
    data: Data,
    column: str | None,
    weights: Any,
    censored: Sequence[str] | None,
    formulas: Sequence[str] = (),
    drop_missing: bool = False,
) -> tuple[Sample | None, dict[str, Any]]:
    """A path becomes the spec's `data` section, as `--data` does; anything else a Sample (with the
    covariate columns that the right-hand sides `formulas` read)."""
    if isinstance(data, (str, os.PathLike)):
        return None, {
            "path": os.fspath(data),
            "column": column,
            "censored": None if censored is None else list(censored),
            "weights": weights,
            "drop_missing": drop_missing,
        }
    from nllflow.data.formulas import required_columns

    covariates = sorted({c for text in formulas for c in required_columns(text.split("~")[-1])})
    sample = memory_sample(data, column, weights, censored, covariates, drop_missing)
    return sample, {"memory": sample.source}


def _bootstrap_section(bootstrap: int | Mapping[str, Any] | None) -> dict[str, Any] | None:
    if bootstrap is None:
        return None
    return dict(bootstrap) if isinstance(bootstrap, Mapping) else {"replicates": bootstrap}
