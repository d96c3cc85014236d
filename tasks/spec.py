"""Experiment specs: frozen pydantic models that are both the YAML files in `experiments/` and the
parameters of the Prefect flows (so the CLI, YAML and `prefect deployment run --param` share one
schema)."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tasks.errors import InputError
from tasks.families import get_family
from tasks.fitting import Optimizer as OptimizerName
from tasks.fitting import ParamValue


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Simulation(_Frozen):
    """Draw `n` points from `family` (default: the spec's family) at `params`, from `seed`."""

    family: str | None = None
    params: dict[str, ParamValue]
    n: int = Field(gt=1)
    seed: int = 0

    @field_validator("family")
    @classmethod
    def _known_family(cls, name: str | None) -> str | None:
        return None if name is None else get_family(name).name


class DataSpec(_Frozen):
    """Where the data come from: a column of a CSV/Parquet file, or a simulation. `censored`
    names two columns [LEFT, RIGHT] instead of `column`, in fitdistrplus's convention (equal: exact;
    LEFT empty: left-censored at RIGHT; RIGHT empty: right-censored at LEFT; else the interval
    (LEFT, RIGHT]). `holdout` is the fraction kept out of the fit for the held-out NLL."""

    path: str | None = None
    column: str | None = None
    censored: list[str] | None = None
    weights: str | None = None
    simulate: Simulation | None = None
    holdout: float = Field(0.0, ge=0.0, lt=1.0)
    split_seed: int = 0

    @model_validator(mode="after")
    def _one_source(self) -> DataSpec:
        if (self.path is None) == (self.simulate is None):
            raise ValueError("give exactly one of path (with column) or simulate")
        if self.censored is not None:
            if self.path is None or self.column:
                raise ValueError("censored names the two columns of a file (path), instead of column")
            if len(self.censored) != 2 or self.censored[0] == self.censored[1]:
                raise ValueError(f"censored needs two different columns [LEFT, RIGHT], got {self.censored}")
        if self.path is not None:
            if not self.column and self.censored is None:
                raise ValueError("path needs a column (or censored: [LEFT, RIGHT])")
            if not Path(self.path).is_file():
                raise ValueError(f"data file not found: {self.path}")
        return self


class OptimizerSpec(_Frozen):
    name: OptimizerName = "lbfgs"
    lr: float | None = Field(None, gt=0)
    max_steps: int = Field(500, ge=1)
    gtol: float | None = Field(None, gt=0)
    ftol: float | None = Field(None, ge=0)


class BootstrapSpec(_Frozen):
    """`replicates` refits on resampled data, run as one batched program, for percentile intervals
    at `level` of every free parameter: `nonparametric` resamples the rows, `parametric` draws
    from the fit (and also gives goodness-of-fit p-values for estimated parameters)."""

    replicates: int = Field(ge=2)
    kind: Literal["nonparametric", "parametric"] = "nonparametric"
    seed: int = 0
    level: float = Field(0.95, gt=0.0, lt=1.0)


class SweepSpec(_Frozen):
    """The grid of a sweep: every combination of the listed learning rates, optimisers and
    simulation seeds (an empty list keeps the spec's own value). `fan_out`: `threads` runs the
    children in this process; `deployment` submits each as a run of the fit deployment, so any
    worker of the pool can take it; `batched` fits them all as one tensor program (for
    configurations that share their data and differ only in lr and the optimizer adam or sgd),
    then records each child as `threads` does."""

    lr: list[float] = Field(default_factory=list)
    optimizer: list[OptimizerName] = Field(default_factory=list)
    seed: list[int] = Field(default_factory=list)
    fan_out: Literal["threads", "deployment", "batched"] = "threads"
    deployment: str = "fit/fit"
    timeout_seconds: float = Field(3600.0, gt=0)

    @field_validator("lr")
    @classmethod
    def _positive(cls, rates: list[float]) -> list[float]:
        bad = [r for r in rates if not r > 0]
        if bad:
            raise ValueError(f"learning rates must be > 0, got {bad[0]}")
        return rates


class ExperimentSpec(_Frozen):
    """One experiment: data, family, fixed/initial values, optimiser, optional sweep, device.
    `run_name` names the MLflow run (a sweep sets it per configuration)."""

    name: str = Field(min_length=1)
    description: str = ""
    family: str
    data: DataSpec
    fix: dict[str, ParamValue] = Field(default_factory=dict)
    init: dict[str, ParamValue] = Field(default_factory=dict)
    optimizer: OptimizerSpec = OptimizerSpec()
    sweep: SweepSpec | None = None
    bootstrap: BootstrapSpec | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["float64", "float32"] = "float64"
    run_name: str | None = None

    @field_validator("family")
    @classmethod
    def _known_family(cls, name: str) -> str:
        return get_family(name).name

    @model_validator(mode="after")
    def _batchable(self) -> ExperimentSpec:
        if self.sweep is not None and self.sweep.fan_out == "batched":
            from tasks.batched import check_batchable

            if len(self.sweep.seed) > 1:
                raise ValueError("a batched sweep fits one data set: list at most one sweep.seed, or use fan_out: threads")
            check_batchable(get_family(self.family), self.sweep.optimizer or [self.optimizer.name], self.init)
        return self

    @property
    def simulation_family(self) -> str:
        simulate = self.data.simulate
        return (simulate.family if simulate and simulate.family else None) or self.family

    def configurations(self) -> list[ExperimentSpec]:
        """The sweep's grid as single-configuration specs (just this spec when there is no sweep)."""
        if self.sweep is None:
            return [self]
        rates = self.sweep.lr or [self.optimizer.lr]
        optimizers = self.sweep.optimizer or [self.optimizer.name]
        seeds = self.sweep.seed or [None]
        children = []
        for lr, optimizer, seed in itertools.product(rates, optimizers, seeds):
            data = self.data
            if seed is not None and data.simulate is not None:
                data = data.model_copy(update={"simulate": data.simulate.model_copy(update={"seed": seed})})
            name = [self.family, optimizer]
            if lr is not None:
                name.append(f"lr={lr:g}")
            if len(seeds) > 1:
                name.append(f"seed={seed}")
            children.append(
                self.model_copy(
                    update={
                        "optimizer": self.optimizer.model_copy(update={"lr": lr, "name": optimizer}),
                        "data": data,
                        "sweep": None,
                        "run_name": " ".join(name),
                    }
                )
            )
        return children

    def label(self) -> str:
        """The run name: what differs between the configurations of a sweep."""
        if self.run_name:
            return self.run_name
        lr = f" lr={self.optimizer.lr:g}" if self.optimizer.lr is not None else ""
        return f"{self.family} {self.optimizer.name}{lr}"


FAMILY_GROUPS = ("continuous", "discrete")


class ComparisonSpec(_Frozen):
    """Several families fitted to one data set and ranked by AIC. `families` lists family names
    or one group: `continuous` or `discrete` (every such family whose support holds the data)."""

    name: str = Field(min_length=1)
    families: list[str] = Field(min_length=1)
    data: DataSpec
    optimizer: OptimizerSpec = OptimizerSpec()
    bootstrap: BootstrapSpec | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["float64", "float32"] = "float64"

    @field_validator("families")
    @classmethod
    def _known_families(cls, names: list[str]) -> list[str]:
        if len(names) == 1 and names[0] in FAMILY_GROUPS:
            return names
        grouped = [name for name in names if name in FAMILY_GROUPS]
        if grouped:
            raise ValueError(f"the group {grouped[0]!r} cannot be mixed with family names")
        if len(set(names)) != len(names):
            raise ValueError("families are listed more than once")
        return [get_family(name).name for name in names]

    def configuration(self, family: str) -> ExperimentSpec:
        """The fit of one family, as a child of the comparison."""
        return ExperimentSpec(
            name=self.name, family=family, data=self.data, optimizer=self.optimizer, bootstrap=self.bootstrap,
            device=self.device, dtype=self.dtype, run_name=family,
        )


def format_validation_error(error: ValidationError, source: str = "spec") -> str:
    """One line naming the first invalid field (and how many more there are)."""
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "(top level)"
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = f"unknown key {where.split('.')[-1]!r}"
    more = len(error.errors()) - 1
    return f"invalid {source} at {where}: {message}" + (f" (and {more} more error(s))" if more else "")


def parse_spec(raw: Any, source: str = "spec") -> ExperimentSpec:
    try:
        return ExperimentSpec.model_validate(raw)
    except ValidationError as error:
        raise InputError(format_validation_error(error, source)) from None


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`key.sub=value` assignments; values are parsed as YAML (`0.1`, `[0.01, 0.1]`, `adam`)."""
    result = yaml.safe_load(yaml.safe_dump(raw))  # deep copy
    for assignment in overrides:
        key, sep, text = assignment.partition("=")
        if not sep or not key:
            raise InputError(f"--set needs key=value, got {assignment!r}")
        node = result
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise InputError(f"--set {key}: {part!r} is not a section")
            node = child
        try:
            node[parts[-1]] = yaml.safe_load(text)
        except yaml.YAMLError:
            node[parts[-1]] = text
    return result


def load_spec(path: str | Path, overrides: list[str] | None = None) -> ExperimentSpec:
    """Read and validate a YAML spec; every problem is an InputError of one line."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"spec file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise InputError(f"{path} is not valid YAML: {str(error).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise InputError(f"{path} must hold a mapping of spec keys, got {type(raw).__name__}")
    return parse_spec(apply_overrides(raw, overrides or []), source=str(path))
