"""The linear parameter model: every free parameter of a family (or of one of its mean
parametrisations) is a linear predictor of covariates through a link, g(θ_i) = x_iᵀβ (distributional
regression, as GLMs and GAMLSS write it). A parameter without a formula is one constant: an
intercept-only predictor.

The optimiser sees each design with its non-constant columns standardised (centred when the design
has an intercept, and scaled to unit spread), so a year near 1950 beside a 0/1 dummy does not stall
Adam or L-BFGS. Coefficients are reported on the original scale: with X_s = X A, the original
coefficients are β = A β_s, their gradient A⁻ᵀ ∂/∂β_s, and their covariance A Cov(β_s) Aᵀ.

Rows: every coefficient vector has the shape (rows, k), so a sweep's configurations or the
bootstrap's resamples are rows of one problem, as in the constant model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from torch.distributions.constraints import Constraint

from nllflow.data.formulas import Design
from nllflow.errors import InputError
from nllflow.families import Family, Parametrisation
from nllflow.fitting.engine import RowProblem, StepValues
from nllflow.likelihood.observations import Observations
from nllflow.models.links import Link, resolve_link


def choose_parametrisation(family: Family, names: Sequence[str]) -> Parametrisation | None:
    """The parametrisation whose parameter names the user wrote (formulas, fixed and initial values):
    the family's own when every name is one of its parameters, else the one that has them all."""
    names = set(names)
    choices = " or ".join(", ".join(p) for p in [family.params, *(p.params for p in family.parametrisations.values())])
    known = set(family.params).union(*(p.params for p in family.parametrisations.values()))
    unknown = sorted(names - known)
    if unknown:
        raise InputError(f"{unknown[0]!r} is not a parameter of {family.name}; valid: {choices}")
    if names <= set(family.params):
        return None
    for parametrisation in family.parametrisations.values():
        if names <= set(parametrisation.params):
            return parametrisation
    raise InputError(
        f"{', '.join(sorted(names))} are not parameters of one parametrisation of {family.name}; valid: {choices}"
    )


def parameter_names(family: Family, parametrisation: Parametrisation | None) -> tuple[str, ...]:
    return family.params if parametrisation is None else parametrisation.params


def parameter_constraint(family: Family, parametrisation: Parametrisation | None, name: str) -> Constraint:
    return family.base_constraint(name) if parametrisation is None else parametrisation.constraints[name]


@dataclass
class Predictor:
    """One parameter's linear predictor: its design, link and standardisation (β = A β_s)."""

    name: str
    design: Design
    link: Link
    centre: np.ndarray
    spread: np.ndarray

    @property
    def size(self) -> int:
        return len(self.design.columns)

    @property
    def labels(self) -> list[str]:
        return [f"{self.name}:{column}" for column in self.design.columns]

    def standardise(self, matrix: np.ndarray) -> np.ndarray:
        return (matrix - self.centre) / self.spread

    def to_original(self) -> np.ndarray:
        """A with β = A β_s: X_s = (X - centre) / spread column by column, the intercept kept."""
        size = self.size
        transform = np.diag(1 / self.spread)
        if self.design.has_intercept:
            intercept = self.design.columns.index("Intercept")
            transform[intercept, :] -= self.centre / self.spread
            transform[intercept, intercept] = 1.0
        return transform.reshape(size, size)


def _standardisation(design: Design) -> tuple[np.ndarray, np.ndarray]:
    matrix = design.matrix
    centre = matrix.mean(axis=0) if design.has_intercept else np.zeros(matrix.shape[1])
    spread = matrix.std(axis=0) if design.has_intercept else np.sqrt((matrix**2).mean(axis=0))
    constant = spread <= 1e-12 * np.abs(matrix).max(axis=0).clip(min=1e-300)
    centre = np.where(constant, 0.0, centre)
    spread = np.where(constant | (spread == 0), 1.0, spread)
    return centre, spread


class LinearModel:
    """The linear predictors of a family's free parameters for one data set (see the module's
    docstring). `fixed` holds values in the parametrisation's own names."""

    kind = "linear"

    def __init__(
        self,
        family: Family,
        parametrisation: Parametrisation | None,
        designs: Mapping[str, Design],
        links: Mapping[str, str] | None = None,
        fixed: Mapping[str, float] | None = None,
    ):
        self.family, self.parametrisation = family, parametrisation
        self.names = parameter_names(family, parametrisation)
        self.fixed = dict(fixed or {})
        links = dict(links or {})
        unknown = sorted(set(links) - set(self.names))
        if unknown:
            raise InputError(
                f"--link names {unknown[0]!r}, not a parameter of {family.name}; valid: {', '.join(self.names)}"
            )
        self.free = tuple(name for name in self.names if name not in self.fixed)
        self.predictors: dict[str, Predictor] = {}
        for name in self.free:
            design = designs[name]
            constraint = parameter_constraint(family, parametrisation, name)
            centre, spread = _standardisation(design)
            self.predictors[name] = Predictor(
                name, design, resolve_link(name, constraint, links.get(name)), centre, spread
            )
        self.transforms = {name: torch.as_tensor(p.to_original()) for name, p in self.predictors.items()}

    @property
    def optimised(self) -> tuple[str, ...]:
        return self.free

    @property
    def size(self) -> int:
        return sum(p.size for p in self.predictors.values())

    @property
    def formula_parameters(self) -> tuple[str, ...]:
        """The free parameters with a formula of their own (the others are a constant)."""
        return tuple(name for name, p in self.predictors.items() if p.design.formula != "1")

    def labels(self) -> list[str]:
        return [label for p in self.predictors.values() for label in p.labels]

    def design_matrices(self) -> dict[str, np.ndarray]:
        """The designs of the data the model was built on, by parameter."""
        return {name: p.design.matrix for name, p in self.predictors.items()}

    def encode(self, covariates: pd.DataFrame | None) -> dict[str, np.ndarray]:
        """The designs of other rows (held out, a test file, new data to predict)."""
        rows = 0 if covariates is None else len(covariates)
        return {
            name: p.design.encode(covariates) if p.design.spec is not None else np.ones((rows, 1))
            for name, p in self.predictors.items()
        }

    def features(self, designs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The standardised design matrices the optimiser's observations carry, by parameter."""
        return {name: p.standardise(designs[name]) for name, p in self.predictors.items()}

    def values(self, coefficients: Mapping[str, Tensor], features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Each parameter (in the parametrisation's names) per row: (rows, observations) for the free
        ones from their standardised coefficients (rows, k), the fixed ones as given."""
        return self.values_of_predictors(self.predictors_of(coefficients, features))

    def predictors_of(self, coefficients: Mapping[str, Tensor], features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """η = X_s β_s of each free parameter, (rows, observations)."""
        return {
            name: coefficients[name] @ features[name].transpose(0, 1).to(coefficients[name]) for name in self.predictors
        }

    def values_of_predictors(self, etas: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Each parameter's values from the free ones' linear predictors, the fixed ones as given."""
        values = {name: p.link.inverse(etas[name]) for name, p in self.predictors.items()}
        some = next(iter(values.values()), None)
        for name, value in self.fixed.items():
            values[name] = torch.as_tensor(
                value,
                dtype=some.dtype if some is not None else torch.float64,
                device=some.device if some is not None else None,
            )
        return values

    def natural(self, values: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The family's own parameters from the parametrisation's."""
        if self.parametrisation is None:
            return dict(values)
        return self.parametrisation.to_natural(values)

    def original(self, name: str, standardised: Tensor) -> Tensor:
        """Coefficients of `name` on the original scale, (rows, k)."""
        return standardised @ self.transforms[name].to(standardised).transpose(0, 1)

    def standardised(self, name: str, original: Tensor) -> Tensor:
        return original @ torch.linalg.inv(self.transforms[name].to(original)).transpose(0, 1)

    def intercept_start(self, constants: Mapping[str, float]) -> dict[str, Tensor]:
        """Standardised coefficients that give each free parameter the value `constants[name]` at
        every row (least squares on the design: the intercept where there is one)."""
        start = {}
        for name, p in self.predictors.items():
            target = p.link.forward(torch.tensor(float(constants[name]), dtype=torch.float64))
            if p.design.has_intercept:  # the other standardised columns are centred: orthogonal to it
                start[name] = torch.zeros((1, p.size), dtype=torch.float64)
                start[name][0, p.design.columns.index("Intercept")] = target
                continue
            features = torch.as_tensor(p.standardise(p.design.matrix))
            solution = torch.linalg.lstsq(
                features, torch.full((features.shape[0], 1), float(target), dtype=torch.float64)
            ).solution
            start[name] = solution.reshape(1, -1)
        return start


class LinearProblem(RowProblem):
    """A linear model's fits to one set of observations (with `features` by parameter), one row per
    start (`starts`: standardised coefficients by parameter, each (1, k))."""

    def __init__(self, model: LinearModel, observations: Observations, starts: Sequence[Mapping[str, Tensor]]):
        self.model, self.observations, self.rows = model, observations, len(starts)
        self.family = model.family
        self.discrete = model.family.discrete
        self.description = model.family.name
        self.batched = len(observations.batch_shape) > 0
        labels = model.labels()
        self.columns = ["nll", "mean_nll", "grad_norm", *labels, *[f"grad_{label}" for label in labels]]
        dtype, device = observations.dtype, observations.device
        self.leaves = [
            [
                start[name].to(dtype=dtype, device=device).reshape(1, -1).clone().requires_grad_(True)
                for name in model.optimised
            ]
            for start in starts
        ]

    def _everyone(self, rows: Tensor, coefficients: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], Tensor | None]:
        """Batched observations hold one data set per row of the problem: `rows`' coefficients among
        every other row's current ones, and where `rows` sit."""
        if not self.batched or len(rows) == self.rows:
            return dict(coefficients), None
        positions = rows.to(self.observations.device)
        with torch.no_grad():
            everyone = self.assemble(torch.arange(self.rows))
        return {name: everyone[name].index_copy(0, positions, value) for name, value in coefficients.items()}, positions

    def parameters(self, coefficients: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """The parametrisation's values and the family's natural parameters, per row of the data."""
        values = self.model.values(coefficients, self.observations.features)
        return values, self.model.natural(values)

    def mean_nll(self, rows: Tensor, coefficients: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        spread, positions = self._everyone(rows, coefficients)
        _, natural = self.parameters(spread)
        total = self.observations.log_likelihood(self.family, natural, per_row=True)
        if positions is not None:
            total = total[positions]
            natural = {name: value[positions] if value.dim() > 1 else value for name, value in natural.items()}
        return -total.reshape(len(rows)) / self.row_weight(rows), natural

    def evaluate(self, rows: Tensor, *, trace: bool = True) -> StepValues:
        remembered = self.remembered(rows)
        if remembered is not None:
            return remembered
        model, count = self.model, len(rows)
        with torch.enable_grad():
            coefficients = self.assemble(rows)
            mean_nll, natural = self.mean_nll(rows, coefficients)
            names = list(model.optimised)
            grads = torch.autograd.grad(mean_nll.sum(), [coefficients[n] for n in names]) if names else ()
        mean_nll = mean_nll.detach()
        gradient = dict(zip(names, grads, strict=True))
        if names:
            max_gradient = torch.stack([g.abs().amax(1) for g in grads]).amax(0)
        else:
            max_gradient = mean_nll.new_zeros(count)
        finite = torch.stack(
            [
                torch.isfinite(v.detach()).reshape(count, -1).all(1)
                if v.dim() > 1
                else torch.isfinite(v.detach()).all().expand(count)
                for v in natural.values()
            ]
        ).all(0)
        gradients = [[gradient[n][i : i + 1] for n in names] for i in range(count)]
        columns = self._columns(coefficients, gradient, mean_nll, rows) if trace else None
        return StepValues(rows, mean_nll, max_gradient, gradients, columns, finite)

    def _columns(
        self, coefficients: Mapping[str, Tensor], gradient: Mapping[str, Tensor], mean_nll: Tensor, rows: Tensor
    ) -> Tensor:
        """nll, mean_nll, grad_norm, then every coefficient and its gradient on the original scale."""
        values, grads = [], []
        for name in self.model.optimised:
            values.append(self.model.original(name, coefficients[name].detach()))
            inverse = torch.linalg.inv(self.model.transforms[name].to(gradient[name]))
            grads.append(gradient[name] @ inverse)
        grad = torch.cat(grads, 1) if grads else mean_nll.new_zeros((len(rows), 0))
        weight = self.row_weight(rows).to(mean_nll)
        head = torch.stack([mean_nll * weight, mean_nll, grad.norm(dim=1)], 1)
        return torch.cat([head, *values, grad], 1)

    # --- for Newton's method and for results ---

    def regular_columns(self) -> list[int]:
        return list(range(self.model.size))

    def flat(self, rows: Tensor) -> Tensor:
        coefficients = self.assemble(rows)
        return torch.cat([coefficients[name].detach() for name in self.model.optimised], 1)

    def set_flat(self, rows: Tensor, flat: Tensor) -> None:
        sizes = [self.model.predictors[name].size for name in self.model.optimised]
        with torch.no_grad():
            for i, row in enumerate(rows.tolist()):
                for leaf, piece in zip(self.leaves[row], flat[i].split(sizes), strict=True):
                    leaf.copy_(piece.reshape(leaf.shape))

    def objective(self, rows: Tensor, flat: Tensor) -> Tensor:
        return self.mean_nll(rows, self._pieces(flat))[0]

    def _pieces(self, flat: Tensor) -> dict[str, Tensor]:
        sizes = [self.model.predictors[name].size for name in self.model.optimised]
        return dict(zip(self.model.optimised, flat.split(sizes, 1), strict=True))

    def derivatives(self, rows: Tensor, flat: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The mean NLL of each row at `flat`, its gradient and Hessian, through the linear
        predictors: the observations are independent, so each observation's NLL depends on its own
        η_a = x_aᵀβ_a alone and autograd gives every observation's ∂ℓ/∂η_a and ∂²ℓ/∂η_a∂η_b in one
        backward pass per parameter a. Then ∇ = Σ X_aᵀ ∂ℓ/∂η_a and H_ab = X_aᵀ diag(∂²ℓ/∂η_a∂η_b) X_b
        (the Newton step of IRLS), instead of one backward pass per coefficient."""
        model, names = self.model, list(self.model.optimised)
        features = {name: self.observations.features[name].to(flat) for name in names}
        with torch.no_grad():
            etas = model.predictors_of(self._pieces(flat), features)
        with torch.enable_grad():
            leaves = {name: eta.requires_grad_(True) for name, eta in etas.items()}
            mean_nll = self._mean_nll_of_predictors(rows, leaves)
            first = torch.autograd.grad(mean_nll.sum(), [leaves[n] for n in names], create_graph=True)
            second = []
            for a, gradient in enumerate(first):
                if gradient.requires_grad:
                    row = torch.autograd.grad(
                        gradient.sum(), [leaves[n] for n in names], retain_graph=a < len(names) - 1, allow_unused=True
                    )
                else:  # linear in η_a: no curvature of its own
                    row = [None] * len(names)
                second.append([torch.zeros_like(gradient) if h is None else h for h in row])
        gradient = torch.cat([g.detach() @ features[n] for g, n in zip(first, names, strict=True)], 1)
        hessian = torch.cat(
            [
                torch.cat(
                    [torch.einsum("rn,nk,nl->rkl", second[a][b].detach(), features[a_name], features[b_name])
                     for b, b_name in enumerate(names)],
                    2,
                )
                for a, a_name in enumerate(names)
            ],
            1,
        )  # fmt: skip
        return mean_nll.detach(), gradient, hessian

    def _mean_nll_of_predictors(self, rows: Tensor, etas: Mapping[str, Tensor]) -> Tensor:
        """The mean NLL of `rows` at their linear predictors (rows, observations); batched
        observations see every other row's current predictors beside them."""
        positions = None
        if self.batched and len(rows) != self.rows:
            positions = rows.to(self.observations.device)
            with torch.no_grad():
                everyone = self.model.predictors_of(self.assemble(torch.arange(self.rows)), self.observations.features)
            etas = {name: everyone[name].index_copy(0, positions, eta) for name, eta in etas.items()}
        natural = self.model.natural(self.model.values_of_predictors(etas))
        total = self.observations.log_likelihood(self.family, natural, per_row=True)
        if positions is not None:
            total = total[positions]
        return -total.reshape(len(rows)) / self.row_weight(rows)

    def coefficients_of(self, row: int) -> dict[str, Tensor]:
        """The row's standardised coefficients by parameter, each (1, k)."""
        return {name: leaf.detach().clone() for name, leaf in zip(self.model.optimised, self.leaves[row], strict=True)}


def refuse_unsupported(
    family: Family,
    parametrisation: Parametrisation | None,
    formulas: Mapping[str, str],
    fixed: Mapping[str, float],
    shapes: Mapping[str, tuple[int, ...]],
) -> None:
    """What a linear model cannot describe, refused in one line before any fit."""
    names = parameter_names(family, parametrisation)
    unknown = sorted(set(formulas) - set(names))
    if unknown:
        raise InputError(
            f"a formula for {unknown[0]!r}, which is not a parameter of {family.name}; valid: {', '.join(names)}"
        )
    for name in formulas:
        if name in fixed:
            raise InputError(f"{name} is fixed (--fix) and has a formula: give one or the other")
    for name in names:
        if name in fixed:
            continue
        if parametrisation is None and name in family.constraint_rules:
            raise InputError(
                f"{family.name}'s {name} has a support set by the data, which a linear predictor cannot "
                f"keep; fix it (--fix {name}=VALUE) to model the others"
            )
        if parametrisation is None and shapes.get(name, ()) != ():
            raise InputError(f"{family.name}'s {name} is a vector parameter; formulas are for scalar parameters")
    if family.extra_starts is not None or family.polish is not None:
        free = [n for n in names if n not in fixed and n in family.non_regular]
        if free:
            raise InputError(f"{family.name}'s {', '.join(free)} sits on the data at its MLE; fix it to use formulas")


def linear_model_for(
    family: Family,
    formulas: Mapping[str, str],
    links: Mapping[str, str],
    fixed: Mapping[str, float],
    init: Mapping[str, float],
    covariates: pd.DataFrame,
    observations: Observations,
) -> LinearModel:
    """The linear model a spec asks for on a data set: the parametrisation its names choose, a design
    per free parameter (an intercept where there is no formula), the links; everything checked."""
    parametrisation = checked_parametrisation(family, formulas, [*fixed, *init], fixed, observations)
    names = parameter_names(family, parametrisation)
    designs = predictor_designs([name for name in names if name not in fixed], formulas, covariates, observations)
    return LinearModel(family, parametrisation, designs, links, {name: float(value) for name, value in fixed.items()})


def checked_parametrisation(
    family: Family,
    formulas: Mapping[str, str],
    named: Sequence[str],
    fixed: Mapping[str, float],
    observations: Observations,
) -> Parametrisation | None:
    """The parametrisation that the formulas' and the other `named` parameters' names choose, with
    what a parameter model cannot describe and bad fixed values refused."""
    from nllflow.models.constant import parameter_shapes

    parametrisation = choose_parametrisation(family, [*formulas, *named])
    refuse_unsupported(family, parametrisation, formulas, fixed, parameter_shapes(family, observations))
    check_fixed(family, parametrisation, fixed, observations)
    return parametrisation


def predictor_designs(
    names: Sequence[str], formulas: Mapping[str, str], covariates: pd.DataFrame | None, observations: Observations
) -> dict[str, Design]:
    """The design of each parameter in `names`: its formula's, else an intercept."""
    from nllflow.data.formulas import build_design, intercept_design

    rows = observations.n_rows
    return {
        name: build_design(name, formulas[name], covariates) if name in formulas else intercept_design(name, rows)
        for name in names
    }


def check_fixed(
    family: Family, parametrisation: Parametrisation | None, fixed: Mapping[str, float], observations: Observations
) -> None:
    """Fixed values of a parameter model must be finite numbers inside the parameter space."""
    for name, value in fixed.items():
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise InputError(f"fixed value of {name} must be a finite number, got {value!r}")
        constraint = (
            family.constraint(name, observations.bounds(), {})
            if parametrisation is None
            else parametrisation.constraints[name]
        )
        if not bool(constraint.check(torch.tensor(float(value), dtype=torch.float64))):
            raise InputError(
                f"fixed value {name}={value:g} is outside the parameter space of {family.name}: "
                f"it must satisfy {constraint}"
            )
