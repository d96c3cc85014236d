"""The constant parameter model: one value per free parameter, the classical fit of a distribution.

The recipe of torch.distributions' constraint registry: each optimised parameter is a tensor `u` in
unconstrained space, mapped to its natural value with `transform_to(constraint)(u)`; start values
go the other way with `.inv`. Constraints may depend on the data and on each other (a uniform's ends
stay outside the data, a triangular's peak between its bounds). A real-valued parameter (a
location) is counted in units of the family's start scale, so its gradient does not shrink with the
data's scale: `gtol` and Adam's step size mean the same for data in metres or in micrometres.

Rows: every optimised parameter has the shape (rows, 1, *shape), which broadcasts against the
observations (the last dimension), so K configurations of a sweep or B bootstrap refits are one
problem; the trace reports each parameter and ∂(mean NLL)/∂θ on the natural scale (∂NLL/∂μ,
∂NLL/∂σ as in the seed).
"""

from __future__ import annotations

import functools
import math
from typing import Mapping, Sequence

import torch
from torch import Tensor
from torch.distributions import constraints, transform_to
from torch.distributions.constraints import Constraint
from torch.distributions.transforms import AffineTransform, ComposeTransform, Transform

from nllflow.errors import InputError
from nllflow.families import DataBounds, Family
from nllflow.fitting.engine import Outcome, RowProblem, StepValues, autograd_derivatives
from nllflow.likelihood.observations import Observations

ParamValue = float | list[float]


def flat_labels(name: str, shape: tuple[int, ...]) -> list[str]:
    """Names of a parameter's scalar components: `scale`, or `logits_1`, `logits_2`... for vectors
    (numbered from 1: category 0 is the reference)."""
    if shape == ():
        return [name]
    return [f"{name}_{i + 1}" for i in range(math.prod(shape))]


def unflatten(family: Family, labelled: Mapping[str, float]) -> dict[str, Tensor]:
    """Float64 parameter tensors from scalar components by label: the inverse of `flat_labels`."""
    params = {}
    for name in family.params:
        if name in labelled:
            params[name] = torch.tensor(float(labelled[name]), dtype=torch.float64)
            continue
        numbered = {
            int(label.rsplit("_", 1)[1]): value
            for label, value in labelled.items()
            if label.startswith(f"{name}_") and label.rsplit("_", 1)[1].isdigit()
        }
        params[name] = torch.tensor([numbered[i] for i in sorted(numbered)], dtype=torch.float64)
    return params


def show(value: Tensor) -> str:
    return f"{value.item():g}" if value.numel() == 1 else str([round(v, 6) for v in value.flatten().tolist()])


def start_values(family: Family, observations: Observations) -> dict[str, Tensor]:
    """The family's heuristic start values for these observations, in the parameters' shapes
    (computed once per data set)."""

    def compute() -> dict[str, Tensor]:
        shapes = parameter_shapes(family, observations)
        start = family.start(observations.stand_in().exact)
        return {
            name: torch.as_tensor(value, dtype=observations.dtype, device=observations.device).reshape(shapes[name])
            for name, value in start.items()
        }

    return observations.cached(f"start:{family.name}", compute)


def parameter_shapes(family: Family, observations: Observations) -> dict[str, tuple[int, ...]]:
    return observations.cached(f"shapes:{family.name}", lambda: family.shapes(observations.stand_in().values))


def _per_row(tensors: Sequence[Tensor], count: int) -> Tensor:
    """The values of each of `tensors` (rows first) as (count, -1), side by side."""
    flat = [t.reshape(count, -1) for t in tensors]
    return flat[0] if len(flat) == 1 else torch.cat(flat, 1)


class ConstantModel:
    """The family's parameters for one data set: which are fixed or held (by a polish rule), their
    constraints, start values, and the map u -> natural values. Construction only checks the given
    values; everything it reads from the data is computed once per data set (`Observations`)."""

    kind = "constant"

    def __init__(
        self,
        family: Family,
        observations: Observations,
        fixed: Mapping[str, ParamValue | Tensor] | None = None,
        init: Mapping[str, ParamValue | Tensor] | None = None,
        held: Mapping[str, Tensor] | None = None,
    ):
        self.family = family
        observations.prepare(family)
        self._observations = observations
        self.dtype, self.device = observations.dtype, observations.device
        self.shapes = parameter_shapes(family, observations)
        fixed, init = dict(fixed or {}), dict(init or {})
        for kind, given in (("fixed", fixed), ("initial", init)):
            unknown = sorted(set(given) - set(family.params))
            if unknown:
                raise InputError(
                    f"unknown parameter {unknown[0]!r} in the {kind} values for {family.name}; "
                    f"valid: {', '.join(family.params)}"
                )
        for name in family.required_fixed:
            if name not in fixed:
                raise InputError(f"{family.name} needs a fixed {name}: give --fix {name}=VALUE")
        self.fixed = {name: self._tensor(name, value, "fixed") for name, value in fixed.items()}
        self.held = dict(held or {})
        self.free = tuple(name for name in family.params if name not in self.fixed)
        self.optimised = tuple(name for name in self.free if name not in self.held)
        heuristic = start_values(family, observations)
        self.unit = self._unit(heuristic)
        self._static_transforms: dict[str, Transform] = {}
        self.start = self._resolve_start(
            heuristic, {name: self._tensor(name, v, "initial") for name, v in init.items()}
        )

    def _tensor(self, name: str, value: ParamValue | Tensor, kind: str) -> Tensor:
        try:
            tensor = torch.as_tensor(value, dtype=self.dtype, device=self.device)
        except (TypeError, ValueError, RuntimeError):
            raise InputError(f"{kind} value of {name} must be a number, got {value!r}") from None
        shape = self.shapes[name]
        if tensor.shape != shape:
            if tensor.numel() != math.prod(shape):
                raise InputError(
                    f"{kind} value of {name} for {self.family.name} must have {math.prod(shape)} component(s), "
                    f"got {tensor.numel()}"
                )
            tensor = tensor.reshape(shape)
        if not bool(torch.isfinite(tensor).all()):
            raise InputError(f"{kind} value of {name} must be finite, got {value!r}")
        return tensor

    def _unit(self, heuristic: Mapping[str, float | Tensor]) -> float:
        """The unit of real-valued parameters: the family's start scale (from the data), 1 without one."""
        scale = heuristic.get("scale")
        value = float(torch.as_tensor(scale).reshape(-1)[0]) if scale is not None else 1.0
        return value if math.isfinite(value) and value > 0 else 1.0

    @functools.cached_property
    def bounds(self) -> DataBounds:
        """The data's range, read on first use: a family whose support does not depend on the data
        never needs it (it is a min and a max over every observation)."""
        return self._observations.bounds()

    def constraint(self, name: str, known: Mapping[str, Tensor]) -> Constraint:
        if name not in self.family.constraint_rules:
            return self.family.base_constraint(name)
        return self.family.constraint(name, self.bounds, known)

    def tensors(self, values: Mapping[str, ParamValue | Tensor]) -> dict[str, Tensor]:
        """Parameter values on this model's dtype and device, in their parameters' shapes."""
        return {
            name: torch.as_tensor(value, dtype=self.dtype, device=self.device).reshape(self.shapes[name])
            for name, value in values.items()
        }

    def _resolve_start(self, heuristic: Mapping[str, float | Tensor], init: Mapping[str, Tensor]) -> dict[str, Tensor]:
        known: dict[str, Tensor] = {**self.fixed, **self.held}
        start: dict[str, Tensor] = {}
        for name in self.family.order:
            constraint = self.constraint(name, known)
            if name in self.held:
                continue
            if name in self.fixed or name in init:
                value = self.fixed[name] if name in self.fixed else init[name]
                if not bool(constraint.check(value).all()):
                    kind = "fixed" if name in self.fixed else "initial"
                    raise InputError(
                        f"{kind} value {name}={show(value)} is outside the parameter space of {self.family.name}: "
                        f"it must satisfy {constraint} (data range [{self.bounds.min:g}, {self.bounds.max:g}])"
                    )
            else:
                value = torch.as_tensor(heuristic[name], dtype=self.dtype, device=self.device).reshape(
                    self.shapes[name]
                )
                if not (bool(torch.isfinite(value).all()) and bool(constraint.check(value).all())):
                    value = self.transform(constraint)(
                        torch.zeros(self.shapes[name], dtype=self.dtype, device=self.device)
                    )
            known[name] = value
            if name not in self.fixed:
                start[name] = value
        return start

    def transform_of(self, name: str, known: Mapping[str, Tensor]) -> Transform:
        """The transform of `name` given the values `known` so far; built once where the
        constraint reads neither the data nor other parameters (every step maps u twice)."""
        if name in self.family.constraint_rules:
            return self.transform(self.constraint(name, known))
        transform = self._static_transforms.get(name)
        if transform is None:
            transform = self._static_transforms[name] = self.transform(self.family.base_constraint(name))
        return transform

    def transform(self, constraint: Constraint) -> Transform:
        """`transform_to(constraint)`, with a real-valued parameter counted in units of `unit`."""
        if constraint is constraints.real:
            return ComposeTransform([AffineTransform(0.0, self.unit), transform_to(constraint)])
        return transform_to(constraint)

    def natural(self, unconstrained: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Natural values of every parameter (fixed, held and optimised) from the unconstrained ones."""
        known: dict[str, Tensor] = {**self.fixed, **self.held}
        for name in self.family.order:
            if name in unconstrained:
                known[name] = self.transform_of(name, known)(unconstrained[name])
        return {name: known[name] for name in self.family.params}

    def unconstrained(self, natural: Mapping[str, Tensor]) -> dict[str, Tensor]:
        known: dict[str, Tensor] = {**self.fixed, **self.held}
        result = {}
        for name in self.family.order:
            if name in self.optimised:
                result[name] = self.transform_of(name, known).inv(natural[name])
                known[name] = natural[name]
        return result

    def infeasible(self, natural: Mapping[str, Tensor], rows: int) -> list[str | None]:
        """Per row, the first optimised parameter whose value (shaped (rows, 1, *shape)) breaks its
        constraint or is not finite."""
        known: dict[str, Tensor] = {**self.fixed, **self.held}
        found: list[str | None] = [None] * rows
        for name in self.family.order:
            if name in self.optimised:
                value = natural[name]
                ok = (torch.isfinite(value) & self.constraint(name, known).check(value)).reshape(rows, -1).all(1)
                for row in (~ok).nonzero().flatten().tolist():
                    found[row] = found[row] or name
                known[name] = value
        return found

    def first_infeasible(self, natural: Mapping[str, Tensor]) -> str | None:
        """The first optimised parameter of one set of values that breaks its constraint."""
        return self.infeasible(
            {n: v.reshape(1, 1, *self.shapes[n]) for n, v in natural.items() if n in self.optimised}
            | {n: v for n, v in natural.items() if n not in self.optimised},
            1,
        )[0]

    def labels(self, names: Sequence[str]) -> list[str]:
        return [label for name in names for label in flat_labels(name, self.shapes[name])]


class ConstantProblem(RowProblem):
    """A constant model's fits to one set of observations, one row per start (all rows start from
    the model's start values unless `starts` gives each its own natural values)."""

    def __init__(
        self,
        model: ConstantModel,
        observations: Observations,
        rows: int = 1,
        starts: Sequence[Mapping[str, Tensor]] | None = None,
    ):
        self.model, self.observations, self.rows = model, observations, rows
        self.family = model.family
        self.discrete = model.family.discrete
        self.description = model.family.name
        self.batched = len(observations.batch_shape) > 0
        free = model.labels(model.free)
        self.columns = ["nll", "mean_nll", "grad_norm", *free, *[f"grad_{label}" for label in free]]
        starting = [
            model.unconstrained(model.start if starts is None else {**model.start, **starts[row]})
            for row in range(rows)
        ]
        # each optimised parameter's unconstrained values, all rows in one (rows, 1, *shape) tensor
        # whose row views are the rows' leaves: torch's optimisers see a leaf per row, while a
        # batched step reads and writes every row in one operation per parameter (copying into 16
        # rows' leaves one by one was a fifth of a batched Student-t step)
        self.stacked = {
            name: torch.cat([u[name].detach().reshape(1, 1, *model.shapes[name]) for u in starting])
            for name in model.optimised
        }
        self.leaves: list[list[Tensor]] = [
            [self.stacked[name][row : row + 1].requires_grad_(True) for name in model.optimised] for row in range(rows)
        ]

    def _log_likelihood(self, rows: Tensor, params: Mapping[str, Tensor]) -> Tensor:
        """The log-likelihood of each of `rows` at natural `params` (the rows' own values).
        Batched observations (resamples) hold one data set per row of the problem, so the rows are
        evaluated among every other row's current values."""
        if not self.batched or len(rows) == self.rows:
            return self.observations.log_likelihood(self.family, params).reshape(len(rows))
        positions = rows.to(self.observations.device)
        with torch.no_grad():
            everyone = self.model.natural(self.assemble(torch.arange(self.rows)))
        spread = {
            name: everyone[name].index_copy(0, positions, value) if name in self.model.optimised else value
            for name, value in params.items()
        }
        return self.observations.log_likelihood(self.family, spread)[positions]

    def mean_nll(self, rows: Tensor, params: Mapping[str, Tensor]) -> Tensor:
        return -self._log_likelihood(rows, params) / self.row_weight(rows)

    def evaluate(self, rows: Tensor, *, trace: bool = True) -> StepValues:
        """Mean NLL at the rows' current values, its partial derivatives with respect to the natural
        parameters, and (by the chain rule through the transforms) with respect to the leaves."""
        remembered = self.remembered(rows)
        if remembered is not None:
            return remembered
        model = self.model
        count = len(rows)
        with torch.enable_grad():
            u = self.assemble(rows)
            natural = model.natural(u)
            if not self.family.constraint_rules:
                # each natural value is a function of its own u alone (no constraint reads the
                # others), so the gradient reaching it in the backward pass is the partial derivative
                # ∂NLL/∂θ: one pass gives both it and ∂NLL/∂u
                params = {
                    n: natural[n].detach().requires_grad_(True) if n in model.held else natural[n]
                    for n in self.family.params
                }
                mean_nll = self.mean_nll(rows, params)
                wanted = [params[n] for n in model.free] + [u[n] for n in model.optimised]
                grads = torch.autograd.grad(mean_nll.sum(), wanted) if wanted else ()
                grad_natural = dict(zip(model.free, grads[: len(model.free)], strict=True))
                grad_u = list(grads[len(model.free) :])
            else:
                grad_natural, grad_u, mean_nll = self._chained_gradients(rows, u, natural)
        # a copy where the natural value is the optimiser's own tensor or a view of it (an identity
        # transform), which the next step changes in place
        natural = {n: v.detach().clone() if v is u.get(n) or v._is_view() else v.detach() for n, v in natural.items()}
        mean_nll = mean_nll.detach()
        # (a few whole-row operations, not a few per parameter: each costs microseconds)
        if grad_u:
            max_gradient = _per_row(grad_u, count).abs().amax(1)
            finite = _per_row([natural[n] for n in model.optimised], count).isfinite().all(1)
        else:
            max_gradient = mean_nll.new_zeros(count)
            finite = torch.ones(count, dtype=torch.bool, device=mean_nll.device)
        gradients = [grad_u] if count == 1 else [[g[i : i + 1] for g in grad_u] for i in range(count)]
        columns = self._columns(natural, grad_natural, mean_nll, rows) if trace else None
        return StepValues(
            rows, mean_nll, max_gradient, gradients, columns, finite, {"natural": natural, "grad_natural": grad_natural}
        )

    def _chained_gradients(
        self, rows: Tensor, u: Mapping[str, Tensor], natural: Mapping[str, Tensor]
    ) -> tuple[dict[str, Tensor], list[Tensor], Tensor]:
        """∂NLL/∂θ, ∂NLL/∂u and the mean NLL where constraints read other parameters (a peak
        between its bounds): θ's partial derivatives at θ held apart from u, then the chain rule
        through the transforms as a second pass."""
        model = self.model
        leaves = {n: natural[n].detach().requires_grad_(True) for n in model.free}
        params = {n: leaves.get(n, natural[n]) for n in self.family.params}
        mean_nll = self.mean_nll(rows, params)
        free_leaves = [leaves[n] for n in model.free]
        grads = torch.autograd.grad(mean_nll.sum(), free_leaves) if free_leaves else ()
        grad_natural = dict(zip(model.free, grads, strict=True))
        if not model.optimised:
            return grad_natural, [], mean_nll
        # the vector-Jacobian product as the gradient of Σ θ·g with g held (torch.autograd.grad
        # given grad_outputs imports torch.fx and sympy on first use: most of a second)
        pulled = sum((natural[n] * grad_natural[n]).sum() for n in model.optimised)
        return grad_natural, list(torch.autograd.grad(pulled, [u[n] for n in model.optimised])), mean_nll

    def _columns(
        self, natural: Mapping[str, Tensor], grad_natural: Mapping[str, Tensor], mean_nll: Tensor, rows: Tensor
    ) -> Tensor:
        count = len(rows)
        free = self.model.free
        weight = self.row_weight(rows).to(mean_nll)
        if not free:
            return torch.stack([mean_nll * weight, mean_nll, mean_nll.new_zeros(count)], 1)
        # a held parameter's value (and its partial derivative) is one for all rows
        values = _per_row([natural[n].expand(count, 1, *self.model.shapes[n]) for n in free], count)
        grads = _per_row([grad_natural[n].expand(count, 1, *self.model.shapes[n]) for n in free], count)
        return torch.cat([torch.stack([mean_nll * weight, mean_nll, grads.norm(dim=1)], 1), values, grads], 1)

    # --- for the seed's SGD rule and for Newton's method ---

    def natural_step(self, current: StepValues, rows: Tensor, lr: Tensor, step: int) -> list[tuple[int, Outcome, str]]:
        """The seed's rule θ ← θ − lr·∂NLL/∂θ on the natural parameters of `rows`; a row whose step
        takes a parameter outside its constraint stops (at a bound the data set) or diverges (σ ≤ 0:
        with this rule, that is how a too-large learning rate diverges)."""
        model = self.model
        positions = torch.tensor([current.position(int(row)) for row in rows])
        natural, grad = current.extras["natural"], current.extras["grad_natural"]
        rates = lr[rows].to(dtype=self.observations.dtype, device=self.observations.device)
        moved = {}
        for name, value in natural.items():
            if name in model.optimised:
                picked = value[positions.to(value.device)]
                step_size = rates.reshape(len(rows), *([1] * (picked.dim() - 1)))
                moved[name] = picked - step_size * grad[name][positions.to(value.device)]
            else:
                moved[name] = value
        outside = model.infeasible(moved, len(rows))
        ended = []
        with torch.no_grad():
            unconstrained = model.unconstrained(moved)
            for i, row in enumerate(rows.tolist()):
                name = outside[i]
                if name is None:
                    for leaf, parameter in zip(self.leaves[row], model.optimised, strict=True):
                        leaf.copy_(unconstrained[parameter][i : i + 1])
                elif name in self.family.constraint_rules:
                    # a bound set by the data, not a blow-up: the NLL is finite, and a polish rule
                    # can still hold the parameter on the bound
                    ended.append(
                        (
                            row,
                            Outcome.BOUND,
                            f"stopped: the SGD step at step {step} would take {name} past a data bound",
                        )
                    )
                else:
                    ended.append(
                        (
                            row,
                            Outcome.DIVERGED,
                            f"diverged: the SGD step at step {step} took {name} to "
                            f"{show(moved[name][i])}, outside its constraint",
                        )
                    )
        return ended

    def regular_columns(self) -> list[int]:
        """The flat columns of parameters whose likelihood is smooth at the MLE (not at a kink)."""
        columns, at = [], 0
        for name in self.model.optimised:
            size = math.prod(self.model.shapes[name])
            if name not in self.family.non_regular:
                columns += list(range(at, at + size))
            at += size
        return columns

    def assemble(self, rows: Tensor) -> dict[str, Tensor]:
        if len(rows) == 1:
            return super().assemble(rows)
        positions, tracked = rows.to(self.observations.device), torch.is_grad_enabled()
        return {name: stacked[positions].requires_grad_(tracked) for name, stacked in self.stacked.items()}

    def save_rows(self, rows: list[int]) -> dict[str, Tensor]:
        positions = torch.tensor(rows, device=self.observations.device)
        return {name: stacked[positions] for name, stacked in self.stacked.items()}  # (indexing copies)

    def restore_row(self, row: int, saved: dict[str, Tensor], position: int) -> None:
        for name, stacked in self.stacked.items():
            stacked[row] = saved[name][position]

    def flat(self, rows: Tensor) -> Tensor:
        positions = rows.to(self.observations.device)
        return torch.cat([stacked[positions].reshape(len(rows), -1) for stacked in self.stacked.values()], 1)

    def set_flat(self, rows: Tensor, flat: Tensor) -> None:
        positions, at = rows.to(self.observations.device), 0
        with torch.no_grad():
            for stacked in self.stacked.values():
                size = math.prod(stacked.shape[2:])
                stacked[positions] = flat[:, at : at + size].reshape(len(rows), *stacked.shape[1:])
                at += size

    def derivatives(self, rows: Tensor, flat: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return autograd_derivatives(lambda u: self.objective(rows, u), flat)

    def objective(self, rows: Tensor, flat: Tensor) -> Tensor:
        shapes = [self.model.shapes[name] for name in self.model.optimised]
        sizes = [math.prod(shape) for shape in shapes]
        pieces = {
            name: piece.reshape(len(rows), 1, *shape)
            for name, piece, shape in zip(self.model.optimised, flat.split(sizes, 1), shapes, strict=True)
        }
        return self.mean_nll(rows, self.model.natural(pieces))

    def natural_of(self, row: int) -> dict[str, Tensor]:
        """The row's natural values, in each parameter's own shape."""
        with torch.no_grad():
            natural = self.model.natural(dict(zip(self.model.optimised, self.leaves[row], strict=True)))
        return {name: value.reshape(self.model.shapes[name]).detach().clone() for name, value in natural.items()}


class NaturalSGD:
    """The seed's SGD on the natural parameters (`ConstantProblem.natural_step`), one rate per row."""

    def __init__(self, rates: Sequence[float]):
        self.rates = torch.tensor(list(rates), dtype=torch.float64)

    def step(self, problem: ConstantProblem, current: StepValues, rows: Tensor, step: int):
        return problem.natural_step(current, rows, self.rates, step)
