"""From a spec to a fit: the steps of the pipeline as plain functions (`prefect_tasks` wraps them
one to one), and `check`, the one preflight that the CLI, the API and every flow run before any run
is created.

A data file is read once per process (`read_sample` caches by the file's identity and the columns
read), so checking a spec and then fitting it, or fitting several families to one file, reads it once.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Callable, Sequence

from nllflow.data.samples import Sample, check_support, load_censored_sample, load_sample, simulate_sample
from nllflow.errors import InputError
from nllflow.evaluation.summary import Evaluation, evaluate_fit
from nllflow.families import Family, family_names, get_family
from nllflow.fitting.bootstrap import bootstrap, check_bootstrap
from nllflow.fitting.mle import FitResult, FitSettings, fit_mle, resolve_device, resolve_dtype
from nllflow.fitting.network import fit_network
from nllflow.fitting.regression import fit_regression
from nllflow.likelihood.observations import Observations
from nllflow.models.constant import ConstantModel
from nllflow.models.linear import LinearModel, linear_model_for
from nllflow.models.network import Architecture, NetworkModel, Training, check_training, network_model_for
from nllflow.spec import FAMILY_GROUPS, BootstrapSpec, ComparisonSpec, DataSpec, ExperimentSpec


@dataclass(frozen=True)
class SplitSample:
    """The data of one experiment: what the fit sees, what is held out of it, a network's
    validation rows (split off the training rows, for early stopping) and the rows of a test file."""

    full: Sample
    train: Sample
    heldout: Sample | None
    validation: Sample | None = None
    test: Sample | None = None


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
    # a regression's linear model or a network model (None for a distribution's fit)
    model: LinearModel | NetworkModel | None = None
    # a network's validation rows and training settings
    validation: Observations | None = None
    training: Training | None = None
    # the rows of the test file (data.test_path)
    test: Observations | None = None


_samples: dict[tuple, Sample] = {}
_samples_lock = threading.Lock()


def _file_identity(path: str) -> tuple:
    stat = os.stat(path)
    return (os.path.realpath(path), stat.st_mtime_ns, stat.st_size)


def read_sample(source: DataSpec, family: str | None, covariates: Sequence[str] = ()) -> Sample:
    """Read or simulate the data of `source` (with the `covariates` a regression reads); `family`
    simulates when the simulation names none. Files are read once per process while they do not change."""
    if source.simulate is not None:
        simulation = source.simulate
        simulated = simulation.family or family
        if simulated is None:
            raise InputError("data.simulate needs a family here")
        return simulate_sample(get_family(simulated), simulation.params, simulation.n, simulation.seed)
    if source.memory is not None:
        raise InputError(f"data.memory ({source.memory}): data in memory are handed to nllflow.fit, not read")
    try:
        identity = (
            _file_identity(source.path),
            source.column,
            tuple(source.censored or ()),
            source.weights,
            tuple(covariates),
            source.drop_missing,
        )
    except OSError:
        identity = None  # the loader says what is wrong with the path
    with _samples_lock:
        if identity is not None and identity in _samples:
            return _samples[identity]
    if source.censored is not None:
        sample = load_censored_sample(
            source.path,
            *source.censored,
            weights=source.weights,
            covariates=covariates,
            drop_missing=source.drop_missing,
        )
    else:
        sample = load_sample(source.path, source.column, source.weights, covariates, source.drop_missing)
    if identity is not None:
        with _samples_lock:
            _samples[identity] = sample
    return sample


def load_data(spec: ExperimentSpec, sample: Sample | None = None, test: Sample | None = None) -> SplitSample:
    """Read or simulate the spec's data (or take `sample`, data given in memory) and the test file
    (or take `test`),
    check them against the family's support, split off the held-out part and a network's
    validation rows."""
    family = get_family(spec.family)
    source = spec.data
    sample = sample if sample is not None else read_sample(source, spec.family, spec.covariates)
    check_support(family, sample)
    if test is None and source.test_path is not None:
        test_source = source.model_copy(update={"path": source.test_path, "test_path": None})
        test = read_sample(test_source, spec.family, spec.covariates)
    if test is not None:
        check_support(family, test)
    train, heldout = sample, None
    if source.holdout > 0:
        train, heldout = sample.split(source.holdout, source.split_seed)
        check_support(family, train)
    validation = None
    if spec.network is not None and spec.training.validation > 0:
        train, validation = train.split(spec.training.validation, spec.training.seed)
        if not validation.n or not train.n:
            raise InputError(
                f"training.validation={spec.training.validation:g} of {train.n + validation.n} rows leaves "
                "no training or no validation rows"
            )
    return SplitSample(sample, train, heldout, validation, test)


def build_problem(spec: ExperimentSpec, data: SplitSample) -> FitProblem:
    """Put the data on the device and check the fixed and initial values against the family; a spec
    with formulas gets its linear model, whose standardised designs the observations carry."""
    device = resolve_device(spec.device)
    dtype = resolve_dtype(
        spec.dtype or ("float32" if spec.network is not None and device.type == "cuda" else "float64")
    )
    family = get_family(spec.family)
    optimizer = spec.optimizer
    settings = FitSettings(optimizer.name, optimizer.lr, optimizer.max_steps, optimizer.gtol, optimizer.ftol)
    # the data go to the device once, with the designs the model reads
    observations = data.train.observations(dtype, device)
    model: LinearModel | NetworkModel | None = None
    if spec.network is not None:
        network = spec.network
        architecture = Architecture(network.architecture, tuple(network.hidden), network.activation, network.dropout)
        model = network_model_for(
            family,
            network.terms,
            network.parameters,
            architecture,
            spec.formulas,
            spec.links,
            spec.fix,
            spec.init,
            data.train.covariates,
            observations,
            spec.training.seed,
        )
    elif spec.formulas:
        model = linear_model_for(
            family, spec.formulas, spec.links, spec.fix, spec.init, data.train.covariates, observations
        )
    else:
        ConstantModel(family, observations, spec.fix, spec.init)  # raises InputError on bad values

    def on_device(sample: Sample | None, designs: dict | None = None) -> Observations | None:
        if sample is None:
            return None
        if model is None:
            return sample.observations(dtype, device)
        return sample.observations(dtype, device, model.features(designs or model.encode(sample.covariates)))

    if model is not None:
        observations = on_device(data.train, model.design_matrices())
    if spec.bootstrap is not None:
        free = model.free if model is not None else ConstantModel(family, observations, spec.fix, spec.init).free
        check_bootstrap(family, observations, free, spec.bootstrap.kind)
    training = None
    if spec.network is not None:
        settings_of = spec.training
        training = Training(
            settings_of.batch_size,
            settings_of.patience,
            settings_of.scheduler,
            settings_of.clip,
            settings_of.weight_decay,
            settings_of.seed,
        )
        check_training(settings.optimizer, training, spec.network.dropout)
    return FitProblem(
        family,
        observations,
        on_device(data.heldout),
        dict(spec.fix),
        dict(spec.init),
        settings,
        str(device),
        str(dtype).removeprefix("torch."),
        spec.bootstrap,
        model,
        on_device(data.validation),
        training,
        on_device(data.test),
    )


def check(spec: ExperimentSpec) -> dict[str, SplitSample]:
    """Everything that can be refused before a run exists, for every configuration of the spec:
    the data (read once per distinct source), its support, fixed and initial values, the device.
    Returns each distinct data set by `data_key`."""
    loaded: dict[str, SplitSample] = {}
    checked: set[str] = set()
    for configuration in spec.configurations():
        key = data_key(configuration)
        if key not in loaded:
            loaded[key] = load_data(configuration)
        problem_key = key + configuration.model_dump_json(
            include={"fix", "init", "optimizer", "device", "dtype", "bootstrap", "network", "training"}
        )
        if problem_key not in checked:
            checked.add(problem_key)
            build_problem(configuration, loaded[key])
    return loaded


def data_key(spec: ExperimentSpec) -> str:
    """What identifies a configuration's data set: its source and the family simulating it."""
    return spec.data.model_dump_json() + spec.simulation_family


def optimise(problem: FitProblem, progress: Callable[[int, float], None] | None = None) -> FitResult:
    import warnings

    from nllflow.errors import ConvergenceWarning

    with warnings.catch_warnings():
        # the pipeline reports convergence itself (the run's outcome, the CLI's verdict)
        warnings.simplefilter("ignore", ConvergenceWarning)
        if problem.training is not None:
            return fit_network(
                problem.model,
                problem.observations,
                problem.validation,
                settings=problem.settings,
                training=problem.training,
                init=problem.init,
                progress=progress,
            )
        if problem.model is not None:
            return fit_regression(
                problem.model, problem.observations, init=problem.init, settings=problem.settings, progress=progress
            )
        return fit_mle(
            problem.family,
            problem.observations,
            fixed=problem.fixed,
            init=problem.init,
            settings=problem.settings,
            progress=progress,
        )


def evaluate(problem: FitProblem, data: SplitSample, result: FitResult) -> Evaluation | None:
    """The evaluation of the fit, with the bootstrap's intervals and p-values when one is asked for;
    None for a diverged fit: there is no estimate to evaluate."""
    if result.diverged:
        return None
    evaluation = evaluate_fit(
        problem.family,
        problem.observations,
        result,
        heldout=problem.heldout,
        truth=data.full.truth,
        validation=problem.validation,
        test=problem.test,
    )
    settings = problem.bootstrap
    if settings is not None:
        evaluation.bootstrap = bootstrap(
            problem.family,
            problem.observations,
            result,
            replicates=settings.replicates,
            kind=settings.kind,
            seed=settings.seed,
            level=settings.level,
            fixed=problem.fixed,
        )
    return evaluation


def run_core(
    spec: ExperimentSpec, sample: Sample | None = None, test: Sample | None = None
) -> tuple[SplitSample, FitProblem, FitResult, Evaluation | None]:
    """The whole estimation for one configuration (on `sample`, and `test`, when the data were
    given in memory), without orchestration or recording."""
    data = load_data(spec, sample, test)
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
        family
        for family in map(get_family, family_names())
        if family.discrete == (group == "discrete") and not family.required_fixed and family.param_shapes is None
    ]


def plan_comparison(spec: ComparisonSpec) -> ComparisonPlan:
    """Every listed family must accept the data (else an InputError); a group keeps its members
    whose support holds the data. The first configuration's problem is checked too."""
    from nllflow.data.formulas import required_columns

    covariates = sorted({column for text in spec.formulas.values() for column in required_columns(text)})
    sample = read_sample(spec.data, None, covariates)
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
    fitted = []
    for configuration in chosen:
        try:
            check(configuration)
        except InputError as error:
            if not grouped:
                raise
            skipped[configuration.family] = str(error)  # a group member that cannot take the formulas
            continue
        fitted.append(configuration)
    if not fitted:
        raise InputError(f"no {spec.families[0]} family accepts the data in {sample.source}")
    return ComparisonPlan(fitted, skipped, notes)
