"""Experiment specs: frozen pydantic models that are both the YAML files in `experiments/` and the
parameters of the Prefect flows (so the CLI, YAML and `prefect deployment run --param` share one
schema)."""

from __future__ import annotations

import itertools
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from nllflow.errors import InputError
from nllflow.families import get_family
from nllflow.fitting.mle import Optimizer as OptimizerName
from nllflow.models.constant import ParamValue


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
    (LEFT, RIGHT]). `holdout` is the fraction kept out of the fit for the held-out NLL. `memory`
    describes data that the Python API (`nllflow.fit`) was handed in memory: nothing is read."""

    path: str | None = None
    column: str | None = None
    censored: list[str] | None = None
    weights: str | None = None
    simulate: Simulation | None = None
    memory: str | None = None
    holdout: float = Field(0.0, ge=0.0, lt=1.0)
    split_seed: int = 0
    # leave out the rows where a column the fit reads is missing (else they are refused)
    drop_missing: bool = False
    # another file with the same columns: the fit's test NLL on its rows
    test_path: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> DataSpec:
        if self.memory is not None:
            if self.path is not None or self.simulate is not None or self.column or self.censored or self.weights:
                raise ValueError("memory describes data given to the Python API in memory: no path, column or simulate")
            return self
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
        if self.test_path is not None:
            if self.path is None:
                raise ValueError("test_path holds rows like those of path: give data.path too")
            if not Path(self.test_path).is_file():
                raise ValueError(f"test data file not found: {self.test_path}")
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


# a Dask scheduler: tcp://, a host name, IPv4 or [IPv6] address, a port
DASK_ADDRESS = re.compile(r"tcp://(?P<host>[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\]):(?P<port>[0-9]{1,5})")


PositiveInt = Annotated[int, Field(gt=0)]


class NetworkSpec(_Frozen):
    """A network parameter model: `terms`, a formula's right-hand side over the data's columns
    (categoricals encoded as in regression), feed a registered network (`architecture`; `mlp`:
    `hidden` layer sizes, `activation`, `dropout`) whose outputs are `parameters` on their links'
    scale (default: every free parameter without a formula)."""

    terms: str = Field(min_length=1)
    parameters: list[str] = Field(default_factory=list)
    architecture: str = "mlp"
    hidden: list[PositiveInt] = Field(default_factory=lambda: [64, 64])
    activation: str = "relu"
    dropout: float = Field(0.0, ge=0.0, lt=1.0)

    @field_validator("terms")
    @classmethod
    def _right_hand_side(cls, terms: str) -> str:
        from nllflow.data.formulas import required_columns

        left, tilde, right = terms.partition("~")
        if tilde:
            raise ValueError(f"network terms are a right-hand side ({right.strip()!r}); name the outputs in parameters")
        required_columns(terms)
        return terms.strip()

    @field_validator("activation")
    @classmethod
    def _known_activation(cls, name: str) -> str:
        from nllflow.models.network import ACTIVATIONS

        if name not in ACTIVATIONS:
            raise ValueError(f"unknown activation {name!r}; valid: {', '.join(ACTIVATIONS)}")
        return name


class TrainingSpec(_Frozen):
    """How a network is trained (one optimiser step of the loop is one epoch; `optimizer.max_steps`
    is the epoch budget): mini-batches of `batch_size` rows (None: the whole data each step), the
    fraction of the training rows kept for `validation` and early stopping after `patience` epochs
    without improvement, the learning-rate `scheduler`, gradient-norm `clip`, `weight_decay` and the
    `seed` of the initial weights, the validation split and the shuffling."""

    batch_size: int | None = Field(None, gt=0)
    validation: float = Field(0.2, ge=0.0, lt=1.0)
    patience: int = Field(20, ge=1)
    scheduler: Literal["none", "plateau", "cosine"] = "none"
    clip: float | None = Field(None, gt=0)
    weight_decay: float = Field(0.0, ge=0.0)
    seed: int = 0


class SweepSpec(_Frozen):
    """The grid of a sweep: every combination of the listed learning rates, optimisers and
    simulation seeds, and for a network of the listed hidden sizes, weight decays and batch sizes
    (an empty list keeps the spec's own value). `fan_out`: `threads` runs the
    children in this process; `deployment` submits each as a run of the fit deployment, so any
    worker of the pool can take it; `batched` fits them all as one tensor program (for
    configurations that share their data and differ only in lr and the optimizer adam or sgd),
    then records each child as `threads` does; `dask` runs the same tasks as `threads` on a Dask
    cluster: the scheduler at `dask_address` (tcp://HOST:PORT), or a LocalCluster on this host
    when it is empty."""

    lr: list[float] = Field(default_factory=list)
    optimizer: list[OptimizerName] = Field(default_factory=list)
    seed: list[int] = Field(default_factory=list)
    hidden: list[list[PositiveInt]] = Field(default_factory=list)
    weight_decay: list[Annotated[float, Field(ge=0.0)]] = Field(default_factory=list)
    batch_size: list[PositiveInt] = Field(default_factory=list)
    fan_out: Literal["threads", "deployment", "batched", "dask"] = "threads"
    deployment: str = "fit/fit"
    timeout_seconds: float = Field(3600.0, gt=0)
    dask_address: str = ""

    @field_validator("lr")
    @classmethod
    def _positive(cls, rates: list[float]) -> list[float]:
        bad = [r for r in rates if not r > 0]
        if bad:
            raise ValueError(f"learning rates must be > 0, got {bad[0]}")
        return rates

    @field_validator("dask_address")
    @classmethod
    def _scheduler_address(cls, address: str) -> str:
        match = DASK_ADDRESS.fullmatch(address)
        if address and (match is None or not 0 < int(match["port"]) < 65536):
            raise ValueError(
                f"expected empty (a LocalCluster on this host) or tcp://HOST:PORT of a Dask scheduler, got {address!r}"
            )
        return address

    @model_validator(mode="after")
    def _address_needs_dask(self) -> SweepSpec:
        if self.dask_address and self.fan_out != "dask":
            raise ValueError(f"dask_address is used by fan_out: dask only (fan_out is {self.fan_out!r})")
        return self


class ExperimentSpec(_Frozen):
    """One experiment: data, family, fixed/initial values, optimiser, optional sweep, device.
    `formulas` makes it a regression: a right-hand side per parameter (`{mean: "Fl + A + C(loc)"}`),
    with `links` overriding a parameter's default link. `network` makes the parameters without a
    formula the outputs of a neural network of covariates, trained as `training` says. `dtype`:
    float64 unless given, but float32 for a network on CUDA. `run_name` names the MLflow run (a
    sweep sets it per configuration). `record_plots: false` records no figures with a fit (in a
    sweep: with none of its children), for large sweeps, where rendering them is most of a child's
    recording time; the parent still gets its loss overlay."""

    name: str = Field(min_length=1)
    description: str = ""
    family: str
    data: DataSpec
    fix: dict[str, ParamValue] = Field(default_factory=dict)
    init: dict[str, ParamValue] = Field(default_factory=dict)
    formulas: dict[str, str] = Field(default_factory=dict)
    links: dict[str, str] = Field(default_factory=dict)
    network: NetworkSpec | None = None
    training: TrainingSpec = TrainingSpec()
    optimizer: OptimizerSpec = OptimizerSpec()
    sweep: SweepSpec | None = None
    bootstrap: BootstrapSpec | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["float64", "float32"] | None = None
    run_name: str | None = None
    record_plots: bool = True

    @model_validator(mode="before")
    @classmethod
    def _network_trains_with_adam(cls, raw: Any) -> Any:
        """A network's optimiser is Adam unless one is named (a distribution's is L-BFGS)."""
        if isinstance(raw, dict) and raw.get("network") is not None:
            optimizer = raw.get("optimizer")
            if optimizer is None:
                return {**raw, "optimizer": {"name": "adam"}}
            if isinstance(optimizer, dict) and optimizer.get("name") is None:
                return {**raw, "optimizer": {**optimizer, "name": "adam"}}
        return raw

    @field_validator("family")
    @classmethod
    def _known_family(cls, name: str) -> str:
        return get_family(name).name

    @field_validator("formulas")
    @classmethod
    def _right_hand_sides(cls, formulas: dict[str, str]) -> dict[str, str]:
        """`PARAM ~ TERMS` or just `TERMS`; checked as data (nllflow.data.formulas), never run."""
        from nllflow.data.formulas import required_columns

        sides = {}
        for name, text in formulas.items():
            left, tilde, right = text.partition("~")
            if tilde and left.strip() != name:
                raise ValueError(f"the formula of {name} is {text!r}: its left-hand side must be {name} (or none)")
            sides[name] = (right if tilde else text).strip()
            required_columns(sides[name])
        return sides

    @model_validator(mode="after")
    def _regression(self) -> ExperimentSpec:
        if self.links and not (self.formulas or self.network):
            raise ValueError("links apply to parameters with formulas or a network; give formulas or network too")
        if (self.formulas or self.network) and self.data.simulate is not None:
            raise ValueError("formulas and networks read covariates from a file: give data.path (and data.column)")
        if self.network is not None:
            both = sorted(set(self.network.parameters) & set(self.formulas))
            if both:
                raise ValueError(f"{both[0]} has a formula and is an output of the network: give one or the other")
            if self.bootstrap is not None:
                raise ValueError("the bootstrap refits distributions and linear models, not networks")
        return self

    @property
    def covariates(self) -> list[str]:
        """The data columns the formulas and the network read."""
        from nllflow.data.formulas import required_columns

        texts = [*self.formulas.values(), *([self.network.terms] if self.network else [])]
        return sorted({column for text in texts for column in required_columns(text)})

    @model_validator(mode="after")
    def _batchable(self) -> ExperimentSpec:
        if self.sweep is not None and self.sweep.fan_out == "batched":
            from nllflow.fitting.batched import check_batchable

            if len(self.sweep.seed) > 1:
                raise ValueError(
                    "a batched sweep fits one data set: list at most one sweep.seed, or use fan_out: threads"
                )
            if self.formulas or self.network:
                raise ValueError(
                    "a batched sweep fits distributions without formulas or networks; use fan_out: threads"
                )
            check_batchable(get_family(self.family), self.sweep.optimizer or [self.optimizer.name], self.init)
        return self

    @property
    def simulation_family(self) -> str:
        simulate = self.data.simulate
        return (simulate.family if simulate and simulate.family else None) or self.family

    @model_validator(mode="after")
    def _network_grid(self) -> ExperimentSpec:
        grid = self.sweep
        if grid is not None and self.network is None and (grid.hidden or grid.weight_decay or grid.batch_size):
            raise ValueError("sweep.hidden, sweep.weight_decay and sweep.batch_size vary a network: give network too")
        return self

    def configurations(self) -> list[ExperimentSpec]:
        """The sweep's grid as single-configuration specs (just this spec when there is no sweep)."""
        if self.sweep is None:
            return [self]
        grid = self.sweep
        network, training = self.network, self.training
        rates = grid.lr or [self.optimizer.lr]
        optimizers = grid.optimizer or [self.optimizer.name]
        seeds = grid.seed or [None]
        hidden = grid.hidden or [network.hidden if network else None]
        decays = grid.weight_decay or [training.weight_decay]
        batches = grid.batch_size or [training.batch_size]
        children = []
        for lr, optimizer, seed, sizes, decay, batch in itertools.product(
            rates, optimizers, seeds, hidden, decays, batches
        ):
            data = self.data
            if seed is not None and data.simulate is not None:
                data = data.model_copy(update={"simulate": data.simulate.model_copy(update={"seed": seed})})
            name = [self.family, optimizer]
            if lr is not None:
                name.append(f"lr={lr:g}")
            if len(seeds) > 1:
                name.append(f"seed={seed}")
            if len(grid.hidden) > 1:
                name.append("hidden=" + ("x".join(map(str, sizes)) or "none"))
            if len(grid.weight_decay) > 1:
                name.append(f"wd={decay:g}")
            if len(grid.batch_size) > 1:
                name.append(f"batch={batch}")
            children.append(
                self.model_copy(
                    update={
                        "optimizer": self.optimizer.model_copy(update={"lr": lr, "name": optimizer}),
                        "data": data,
                        "network": network.model_copy(update={"hidden": sizes}) if network else None,
                        "training": training.model_copy(update={"weight_decay": decay, "batch_size": batch}),
                        "sweep": None,
                        "run_name": " ".join(name),
                    }
                )
            )
        return children

    @property
    def rank_by(self) -> str:
        """What a sweep's children are ranked by: a network's validation NLL, else the NLL."""
        if self.network is not None and self.training.validation > 0:
            return "validation_mean_nll"
        return "nll"

    def label(self) -> str:
        """The run name: what differs between the configurations of a sweep."""
        if self.run_name:
            return self.run_name
        lr = f" lr={self.optimizer.lr:g}" if self.optimizer.lr is not None else ""
        return f"{self.family} {self.optimizer.name}{lr}"


FAMILY_GROUPS = ("continuous", "discrete")


class ComparisonSpec(_Frozen):
    """Several families fitted to one data set and ranked by AIC. `families` lists family names
    or one group: `continuous` or `discrete` (every such family whose support holds the data).
    With `formulas` every family is fitted as the same regression (its parameters must carry the
    formulas' names, directly or through a mean parametrisation)."""

    name: str = Field(min_length=1)
    families: list[str] = Field(min_length=1)
    data: DataSpec
    formulas: dict[str, str] = Field(default_factory=dict)
    links: dict[str, str] = Field(default_factory=dict)
    optimizer: OptimizerSpec = OptimizerSpec()
    bootstrap: BootstrapSpec | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["float64", "float32"] | None = None

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
            name=self.name,
            family=family,
            data=self.data,
            formulas=self.formulas,
            links=self.links,
            optimizer=self.optimizer,
            bootstrap=self.bootstrap,
            device=self.device,
            dtype=self.dtype,
            run_name=family,
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


def parse_comparison(raw: Any, source: str = "spec") -> ComparisonSpec:
    try:
        return ComparisonSpec.model_validate(raw)
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


def read_spec_file(path: str | Path) -> dict[str, Any]:
    """The raw mapping of a YAML spec file; every problem is an InputError of one line."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"spec file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise InputError(f"{path} is not valid YAML: {str(error).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise InputError(f"{path} must hold a mapping of spec keys, got {type(raw).__name__}")
    return raw


def load_spec(path: str | Path, overrides: list[str] | None = None) -> ExperimentSpec:
    """Read and validate a YAML spec, with `key.sub=value` overrides."""
    return parse_spec(apply_overrides(read_spec_file(path), overrides or []), source=str(path))


class SpecFile(_Frozen):
    """A spec by reference: a YAML file in `experiments/` and overrides of its keys (`set`:
    {"sweep.fan_out": "deployment"}). What prefect.yaml's deployments pass, so the specs live in
    one place."""

    file: str = Field(min_length=1)
    set: dict[str, Any] = Field(default_factory=dict)

    def load(self) -> ExperimentSpec:
        overrides = [
            f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"
            for key, value in self.set.items()
        ]
        return load_spec(self.file, overrides)


def resolve_spec(spec: ExperimentSpec | ComparisonSpec | SpecFile, restricted: bool = False):
    """The spec itself, or the one a `SpecFile` names. `restricted` (a flow run started through a
    deployment, whose parameters anyone who can start runs chose): the spec file and the data files
    must lie in the worker's allow-list (nllflow.data.access)."""
    from nllflow.data.access import check_readable

    if restricted and isinstance(spec, SpecFile):
        check_readable([spec.file], "a deployment run's spec file")
    resolved = spec.load() if isinstance(spec, SpecFile) else spec
    if restricted:
        check_readable([resolved.data.path, resolved.data.test_path])
    return resolved
