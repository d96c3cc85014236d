"""From a spec to a fit: the steps of the pipeline as plain functions (the Prefect tasks wrap
these one to one)."""

from __future__ import annotations

from dataclasses import dataclass

from tasks.data import Sample, check_support, load_sample, simulate_sample
from tasks.evaluation import Evaluation, evaluate_fit
from tasks.families import Family, get_family
from tasks.fitting import FitResult, FitSettings, Observations, ParameterSpace, fit_mle, resolve_device, resolve_dtype
from tasks.spec import ExperimentSpec

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

def load_data(spec: ExperimentSpec) -> SplitSample:
    """Read or simulate the spec's data, check it against the family's support, split off the
    held-out part."""
    family = get_family(spec.family)
    source = spec.data
    if source.simulate is not None:
        simulation = source.simulate
        sample = simulate_sample(get_family(spec.simulation_family), simulation.params, simulation.n, simulation.seed)
    else:
        sample = load_sample(source.path, source.column, source.weights)
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
    ParameterSpace(family, observations, spec.fix, spec.init)  # raises InputError on bad values
    return FitProblem(family, observations, heldout, dict(spec.fix), dict(spec.init), settings, str(device),
                      str(dtype).removeprefix("torch."))

def optimise(problem: FitProblem, progress=None) -> FitResult:
    return fit_mle(
        problem.family, problem.observations, fixed=problem.fixed, init=problem.init,
        settings=problem.settings, progress=progress,
    )

def evaluate(problem: FitProblem, data: SplitSample, result: FitResult) -> Evaluation:
    return evaluate_fit(problem.family, problem.observations, result, heldout=problem.heldout, truth=data.full.truth)

def run_core(spec: ExperimentSpec) -> tuple[SplitSample, FitProblem, FitResult, Evaluation]:
    """The whole estimation for one configuration, without orchestration or recording."""
    data = load_data(spec)
    problem = build_problem(spec, data)
    result = optimise(problem)
    return data, problem, result, evaluate(problem, data, result)

