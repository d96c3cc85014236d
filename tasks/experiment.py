"""From a spec to a fit: the steps of the pipeline as plain functions (the Prefect tasks wrap
these one to one)."""

from __future__ import annotations

from dataclasses import dataclass

from tasks.bootstrap import bootstrap, check_bootstrap
from tasks.data import Sample, check_support, load_censored_sample, load_sample, simulate_sample
from tasks.evaluation import Evaluation, evaluate_fit
from tasks.errors import InputError
from tasks.families import Family, family_names, get_family
from tasks.fitting import FitResult, FitSettings, Observations, ParameterSpace, fit_mle, resolve_device, resolve_dtype
from tasks.spec import FAMILY_GROUPS, BootstrapSpec, ComparisonSpec, DataSpec, ExperimentSpec

@dataclass(frozen=True)
class SplitSample:
    """The data of one experiment: what the fit sees, and what is held out of it."""

    full: Sample
    train: Sample
    heldout: Sample | None

@dataclass(frozen=True)
class FitProblem:
    """A family, data on the chosen device and dtype, and how to optimise: ready to fit."""

    family: Family
    observations: Observations
    heldout: Observations | None
    fixed: dict
    init: dict
    settings: FitSettings
    device: str
    dtype: str
    bootstrap: BootstrapSpec | None = None

def read_sample(source: DataSpec, family: str | None) -> Sample:
    """Read or simulate the data of `source`; `family` simulates when the simulation names none."""
    if source.simulate is not None:
        simulation = source.simulate
        simulated = simulation.family or family
        if simulated is None:
            raise InputError("data.simulate needs a family here")
        return simulate_sample(get_family(simulated), simulation.params, simulation.n, simulation.seed)
    if source.censored is not None:
        return load_censored_sample(source.path, *source.censored, weights=source.weights)
    return load_sample(source.path, source.column, source.weights)


def load_data(spec: ExperimentSpec) -> SplitSample:
    """Read or simulate the spec's data, check it against the family's support, split off the
    held-out part."""
    family = get_family(spec.family)
    source = spec.data
    sample = read_sample(source, spec.family)
    check_support(family, sample)
    if source.holdout > 0:
        train, heldout = sample.split(source.holdout, source.split_seed)
        check_support(family, train)
        return SplitSample(sample, train, heldout)
    return SplitSample(sample, sample, None)

def build_problem(spec: ExperimentSpec, data: SplitSample) -> FitProblem:
    """Put the data on the device and check the fixed and initial values against the family."""
    device, dtype = resolve_device(spec.device), resolve_dtype(spec.dtype)
    family = get_family(spec.family)
    observations = data.train.observations(dtype, device)
    heldout = data.heldout.observations(dtype, device) if data.heldout is not None else None
    optimizer = spec.optimizer
    settings = FitSettings(optimizer.name, optimizer.lr, optimizer.max_steps, optimizer.gtol, optimizer.ftol)
    space = ParameterSpace(family, observations, spec.fix, spec.init)  # raises InputError on bad values
    if spec.bootstrap is not None:
        check_bootstrap(family, observations, space.free, spec.bootstrap.kind)
    return FitProblem(family, observations, heldout, dict(spec.fix), dict(spec.init), settings, str(device),
                      str(dtype).removeprefix("torch."), spec.bootstrap)

def optimise(problem: FitProblem, progress=None) -> FitResult:
    return fit_mle(
        problem.family, problem.observations, fixed=problem.fixed, init=problem.init,
        settings=problem.settings, progress=progress,
    )

def evaluate(problem: FitProblem, data: SplitSample, result: FitResult) -> Evaluation:
    """The evaluation of the fit, with the bootstrap's intervals and p-values when one is asked for."""
    evaluation = evaluate_fit(problem.family, problem.observations, result, heldout=problem.heldout, truth=data.full.truth)
    settings = problem.bootstrap
    if settings is not None:
        evaluation.bootstrap = bootstrap(
            problem.family, problem.observations, result, replicates=settings.replicates, kind=settings.kind,
            seed=settings.seed, level=settings.level, fixed=problem.fixed,
        )
    return evaluation

def run_core(spec: ExperimentSpec) -> tuple[SplitSample, FitProblem, FitResult, Evaluation]:
    """The whole estimation for one configuration, without orchestration or recording."""
    data = load_data(spec)
    problem = build_problem(spec, data)
    result = optimise(problem)
    return data, problem, result, evaluate(problem, data, result)


@dataclass(frozen=True)
class ComparisonPlan:
    """The fits of a comparison, the group members left out (with why), and notes on those fitted
    differently from the others (no bootstrap where it does not apply)."""

    configurations: list[ExperimentSpec]
    skipped: dict[str, str]
    notes: dict[str, str]


def group_members(group: str) -> list[Family]:
    """The families of a group: continuous or discrete, with scalar parameters none of which must
    be fixed by the user."""
    return [
        family for family in map(get_family, family_names())
        if family.discrete == (group == "discrete") and not family.required_fixed and family.param_shapes is None
    ]


def plan_comparison(spec: ComparisonSpec) -> ComparisonPlan:
    """Every listed family must accept the data (else an InputError); a group keeps its members
    whose support holds the data."""
    sample = read_sample(spec.data, None)
    grouped = spec.families[0] in FAMILY_GROUPS
    candidates = group_members(spec.families[0]) if grouped else [get_family(name) for name in spec.families]
    chosen, skipped, notes = [], {}, {}
    for family in candidates:
        try:
            check_support(family, sample)
        except InputError as error:
            if not grouped:
                raise
            skipped[family.name] = str(error)
            continue
        configuration = spec.configuration(family.name)
        if spec.bootstrap is not None:
            try:
                check_bootstrap(family, sample.observations(), family.params, spec.bootstrap.kind)
            except InputError as error:
                notes[family.name] = str(error)
                configuration = configuration.model_copy(update={"bootstrap": None})
        chosen.append(configuration)
    if not chosen:
        raise InputError(f"no {spec.families[0]} family accepts the data in {sample.source}")
    return ComparisonPlan(chosen, skipped, notes)
