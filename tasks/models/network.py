"""The network parameter model: a torch network maps each row's covariates (a formula's right-hand
side, encoded as in regression) to the unconstrained value of every parameter it targets, which the
parameter's default link (`transform_to` of its constraint) maps to its natural value. Parameters
with a formula of their own keep their linear predictor; fixed ones stay fixed.

The network starts at the intercept-only fit: its output layer's weights are zero and its biases
the constant MLE on the link scale, so training begins at the unconditional fit, never at an
arbitrary point. Architectures are registered by name (`register_network`); the built-in `mlp` is a
multilayer perceptron. A network of one's own is one file: a factory registered with
`@register_network("name")` that returns an `nn.Module` whose last layer is an `nn.Linear` named
`output` (loaded through NLLFLOW_PLUGINS, like families).

Training (`NetworkProblem`, `EpochStep`): one step of the loop is one epoch. With a batch size, an
epoch is a pass of shuffled mini-batches (the run's seed), each an optimiser step; the step's NLL is
the epoch's mean mini-batch NLL and its validation NLL is evaluated on the rows kept out; training
stops early when the validation NLL has not improved for `patience` epochs. Without a batch size an
epoch is one full-batch step, and any optimiser (L-BFGS included) and the gradient test apply.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from nllflow.data.formulas import Design
from nllflow.errors import InputError
from nllflow.families import Family, Parametrisation
from nllflow.fitting.engine import Outcome, RowProblem, StepValues, lbfgs
from nllflow.likelihood.observations import Observations
from nllflow.models.linear import Predictor, _standardisation, parameter_constraint, parameter_names
from nllflow.models.links import Link, resolve_link

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "elu": nn.ELU, "silu": nn.SiLU, "softplus": nn.Softplus,
}  # fmt: skip
NetworkFactory = Callable[..., nn.Module]
NETWORKS: dict[str, NetworkFactory] = {}


def register_network(name: str) -> Callable[[NetworkFactory], NetworkFactory]:
    """Register `factory(inputs, outputs, hidden, activation, dropout) -> nn.Module` as `name`; the
    module's last layer must be an `nn.Linear` attribute named `output`."""

    def decorator(factory: NetworkFactory) -> NetworkFactory:
        if name in NETWORKS:
            raise ValueError(f"network {name!r} is already registered")
        NETWORKS[name] = factory
        return factory

    return decorator


class MLP(nn.Module):
    """Fully connected layers with an activation (and dropout) between them, then `output`."""

    def __init__(self, inputs: int, outputs: int, hidden: Sequence[int], activation: str, dropout: float):
        super().__init__()
        layers: list[nn.Module] = []
        width = inputs
        for size in hidden:
            layers += [nn.Linear(width, size), ACTIVATIONS[activation]()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = size
        self.hidden = nn.Sequential(*layers)
        self.output = nn.Linear(width, outputs)

    def forward(self, x: Tensor) -> Tensor:
        return self.output(self.hidden(x))


@register_network("mlp")
def _mlp(inputs: int, outputs: int, hidden: Sequence[int], activation: str, dropout: float) -> nn.Module:
    return MLP(inputs, outputs, hidden, activation, dropout)


def get_network(name: str) -> NetworkFactory:
    from nllflow.families import load_plugins

    load_plugins()
    if name not in NETWORKS:
        raise InputError(f"unknown network {name!r}; valid: {', '.join(sorted(NETWORKS))}")
    return NETWORKS[name]


@dataclass(frozen=True)
class Architecture:
    """What a network is: its registered name, the hidden sizes, the activation and dropout."""

    name: str = "mlp"
    hidden: tuple[int, ...] = (64, 64)
    activation: str = "relu"
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if any(not isinstance(size, int) or size <= 0 for size in self.hidden):
            raise InputError(f"hidden sizes must be positive whole numbers, got {list(self.hidden)}")
        if self.activation not in ACTIVATIONS:
            raise InputError(f"unknown activation {self.activation!r}; valid: {', '.join(ACTIVATIONS)}")
        if not 0 <= self.dropout < 1:
            raise InputError(f"dropout must lie in [0, 1), got {self.dropout}")

    def build(self, inputs: int, outputs: int) -> nn.Module:
        module = get_network(self.name)(inputs, outputs, list(self.hidden), self.activation, self.dropout)
        if not isinstance(getattr(module, "output", None), nn.Linear):
            raise InputError(f"network {self.name!r} must end in an nn.Linear named `output`")
        return module

    def describe(self) -> dict:
        return {"name": self.name, "hidden": list(self.hidden), "activation": self.activation, "dropout": self.dropout}


class NetworkModel:
    """A network for its `targets` (free parameters), a linear predictor for every other free
    parameter (`designs`: its formula, or an intercept); `links` override default links."""

    kind = "network"

    def __init__(
        self,
        family: Family,
        parametrisation: Parametrisation | None,
        inputs: Design,
        architecture: Architecture,
        targets: Sequence[str],
        designs: Mapping[str, Design],
        links: Mapping[str, str],
        fixed: Mapping[str, float],
        seed: int,
    ):
        self.family, self.parametrisation = family, parametrisation
        self.names = parameter_names(family, parametrisation)
        self.fixed = dict(fixed)
        self.free = tuple(name for name in self.names if name not in self.fixed)
        unknown = sorted(set(links) - set(self.free))
        if unknown:
            raise InputError(
                f"--link names {unknown[0]!r}, not a free parameter of {family.name}; valid: {', '.join(self.free)}"
            )
        self.targets = tuple(targets)
        if not self.targets:
            raise InputError(
                f"the network has no parameter of {family.name} to output: every free one has a formula or is fixed"
            )

        def link(name: str) -> Link:
            return resolve_link(name, parameter_constraint(family, parametrisation, name), links.get(name))

        self.links: dict[str, Link] = {name: link(name) for name in self.targets}
        self.predictors: dict[str, Predictor] = {}
        for name, design in designs.items():
            centre, spread = _standardisation(design)
            self.predictors[name] = Predictor(name, design, link(name), centre, spread)
        self.inputs = inputs
        self.input_columns = [c for c in inputs.columns if c != "Intercept"]
        if not self.input_columns:
            raise InputError(f"the network's terms {inputs.formula!r} give no covariate columns")
        keep = [inputs.columns.index(c) for c in self.input_columns]
        matrix = inputs.matrix[:, keep]
        self.input_centre = matrix.mean(axis=0)
        spread = matrix.std(axis=0)
        self.input_spread = np.where(spread > 0, spread, 1.0)
        self.architecture = architecture
        self.output_scale = np.ones(len(self.targets))  # set by `start`
        self._scale_tensor: tuple | None = None  # output_scale on the device, once
        # the initial weights come from the run's seed, without touching the global generator
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.network = architecture.build(len(self.input_columns), len(self.targets)).double()

    @property
    def optimised(self) -> tuple[str, ...]:
        """The parameters with coefficients of a linear predictor."""
        return tuple(self.predictors)

    @property
    def formula_parameters(self) -> tuple[str, ...]:
        return tuple(name for name, p in self.predictors.items() if p.design.formula != "1")

    @property
    def size(self) -> int:
        """The number of estimated numbers: the network's weights and the linear coefficients."""
        return sum(p.numel() for p in self.network.parameters()) + sum(p.size for p in self.predictors.values())

    def input_features(self, matrix: np.ndarray) -> np.ndarray:
        """The network's standardised inputs from the terms' design (its intercept left out)."""
        keep = [self.inputs.columns.index(c) for c in self.input_columns]
        return (matrix[:, keep] - self.input_centre) / self.input_spread

    def features(self, designs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The observations' features: the network's inputs and each linear predictor's design."""
        features = {"network": self.input_features(designs["network"])}
        features.update({name: p.standardise(designs[name]) for name, p in self.predictors.items()})
        return features

    def design_matrices(self) -> dict[str, np.ndarray]:
        return {"network": self.inputs.matrix, **{name: p.design.matrix for name, p in self.predictors.items()}}

    def encode(self, covariates) -> dict[str, np.ndarray]:
        """The designs of other rows (held out, a test file, new data to predict)."""
        rows = len(covariates)
        return {
            "network": self.inputs.encode(covariates),
            **{name: p.design.encode(covariates) if p.design.spec is not None else np.ones((rows, 1))
               for name, p in self.predictors.items()},
        }  # fmt: skip

    def start(self, constants: Mapping[str, float], response_spread: float) -> dict[str, Tensor]:
        """The intercept-only fit as the start: zero output weights, biases (and linear intercepts) at
        the constants on their links' scale. A target on the identity link (a location) moves in
        units of `response_spread`, the response's standard deviation, as if the response were
        standardised: its output is multiplied by it (`output_scale`), so Adam's steps of about
        `lr` in the weights move a location of 600 ± 300 as easily as one of 0 ± 1."""
        dtype = next(self.network.parameters()).dtype
        spread = response_spread if math.isfinite(response_spread) and response_spread > 0 else 1.0
        self.output_scale = np.array([spread if self.links[name].name == "identity" else 1.0 for name in self.targets])
        self._scale_tensor = None
        with torch.no_grad():
            self.network.output.weight.zero_()
            for j, name in enumerate(self.targets):
                eta = self.links[name].forward(torch.tensor(float(constants[name]), dtype=dtype))
                self.network.output.bias[j] = eta / self.output_scale[j]
        start = {}
        for name, p in self.predictors.items():
            target = float(p.link.forward(torch.tensor(float(constants[name]), dtype=torch.float64)))
            features = torch.as_tensor(p.standardise(p.design.matrix))
            start[name] = torch.linalg.lstsq(
                features, torch.full((len(features), 1), target, dtype=torch.float64)
            ).solution.reshape(1, -1)
        return start

    def values(self, coefficients: Mapping[str, Tensor], features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Each parameter per row of `features` (the parametrisation's names)."""
        inputs = features["network"]
        out = self.network(inputs)
        if self.output_scale.max() != 1.0 or self.output_scale.min() != 1.0:
            key = (inputs.dtype, inputs.device)
            if self._scale_tensor is None or self._scale_tensor[0] != key:
                self._scale_tensor = (key, torch.as_tensor(self.output_scale, dtype=inputs.dtype, device=inputs.device))
            out = out * self._scale_tensor[1]
        values = {name: self.links[name].inverse(out[:, j]) for j, name in enumerate(self.targets)}
        for name, p in self.predictors.items():
            values[name] = p.link.inverse((features[name].to(out) @ coefficients[name].reshape(-1, 1)).reshape(-1))
        for name, value in self.fixed.items():
            values[name] = torch.as_tensor(value, dtype=out.dtype, device=out.device)
        return values

    def natural(self, values: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return dict(values) if self.parametrisation is None else self.parametrisation.to_natural(values)

    def original(self, name: str, standardised: Tensor) -> Tensor:
        transform = torch.as_tensor(self.predictors[name].to_original()).to(standardised)
        return standardised @ transform.transpose(0, 1)

    def layers(self) -> list[tuple[str, list[Tensor]]]:
        """The network's layers with weights (name, parameters), for gradient norms per layer."""
        layers = []
        for name, module in self.network.named_modules():
            own = list(module.parameters(recurse=False))
            if own:
                layers.append((name or "network", own))
        return layers


@dataclass(frozen=True)
class Training:
    """How a network is trained: the mini-batch size (None: full batch), early stopping after
    `patience` epochs without improvement of the validation NLL, the learning-rate schedule,
    gradient clipping, the weight decay and the seed of the shuffling."""

    batch_size: int | None = None
    patience: int = 20
    scheduler: str = "none"
    clip: float | None = None
    weight_decay: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.batch_size is not None and self.batch_size <= 0:
            raise InputError(f"batch size must be a positive number of rows, got {self.batch_size}")
        if self.scheduler not in ("none", "plateau", "cosine"):
            raise InputError(f"unknown scheduler {self.scheduler!r}; valid: none, plateau, cosine")


def check_training(optimizer: str, training: Training, dropout: float) -> None:
    """What L-BFGS cannot train (its line search needs the same deterministic objective every
    step), and newton, whose Hessian over a network's weights is out of reach."""
    if optimizer == "newton":
        raise InputError("newton fits distributions and regressions; a network trains with adam, sgd or lbfgs")
    if optimizer != "lbfgs":
        return
    if training.batch_size is not None:
        raise InputError("L-BFGS takes the whole data each step: drop the batch size or use adam or sgd")
    if training.weight_decay:
        raise InputError("weight decay needs adam or sgd (L-BFGS minimises the NLL itself)")
    if dropout > 0:
        raise InputError("L-BFGS needs a deterministic objective: use adam or sgd with dropout, or dropout 0")


def _total_weight(observations: Observations) -> Tensor | int:
    """The rows' total frequency weight: the number of rows, as a Python int, without weights."""
    censored = observations.censored
    if observations.weights is None and (censored is None or censored.weights is None):
        return observations.n_rows
    return observations.row_weight


class NetworkProblem(RowProblem):
    """A network model's training on `observations` (features "network" and each predictor's), with
    `validation` observations for early stopping (None: none). One row."""

    rows = 1

    def __init__(
        self,
        model: NetworkModel,
        observations: Observations,
        validation: Observations | None,
        start: Mapping[str, Tensor],
        training: Training,
    ):
        self.model, self.observations, self.validation, self.training = model, observations, validation, training
        self.family = model.family
        self.discrete = model.family.discrete
        self.description = model.family.name
        dtype, device = observations.dtype, observations.device
        model.network.to(device=device, dtype=dtype)
        self.coefficients = {
            name: value.to(dtype=dtype, device=device).clone().requires_grad_(True) for name, value in start.items()
        }
        self.leaves = [*model.network.parameters(), *self.coefficients.values()]
        self.layer_names = [name for name, _ in model.layers()] + [f"linear:{n}" for n in self.coefficients]
        self.columns = [
            "nll",
            "mean_nll",
            "grad_norm",
            "learning_rate",
            "val_mean_nll",
            *[f"grad_norm:{name}" for name in self.layer_names],
        ]
        self.epoch: dict[str, Tensor] | None = None  # what the last epoch of mini-batches measured
        self.lr = 0.0

    def row_leaves(self, row: int) -> list[Tensor]:
        return self.leaves

    def nothing_to_optimise(self) -> bool:
        return False

    def row_weight(self, rows: Tensor) -> Tensor:
        return self.observations.row_weight.expand(len(rows))

    def mean_nll(self, observations: Observations) -> Tensor:
        natural = self.model.natural(self.model.values(self.coefficients, observations.features))
        return -observations.log_likelihood(self.family, natural, per_row=True) / _total_weight(observations)

    def validation_nll(self) -> Tensor:
        if self.validation is None:
            return torch.tensor(math.nan, dtype=self.observations.dtype)
        self.model.network.eval()
        with torch.no_grad():
            return self.mean_nll(self.validation).detach()

    def _layer_norms(self) -> Tensor:
        norms = []
        for _, parameters in self.model.layers():
            grads = [p.grad for p in parameters if p.grad is not None]
            norms.append(
                torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))
                if grads
                else torch.tensor(0.0, dtype=self.observations.dtype, device=self.observations.device)
            )
        norms += [
            value.grad.norm() if value.grad is not None else torch.zeros((), device=value.device, dtype=value.dtype)
            for value in self.coefficients.values()
        ]
        return torch.stack(norms).to(self.observations.dtype) if norms else torch.zeros(0)

    def evaluate(self, rows: Tensor, *, trace: bool = True) -> StepValues:
        """Full batch: the training NLL and its gradient here. Mini-batches: what the last epoch
        measured (before the first, the training NLL at the start; no gradient is taken there, so
        the start's gradient norms are NaN)."""
        remembered = self.remembered(rows)
        if remembered is not None:
            return remembered
        full = self.training.batch_size is None
        if not full and self.epoch is None:
            self.model.network.eval()
            with torch.no_grad():
                mean = self.mean_nll(self.observations)
            grads = [torch.zeros_like(p) for p in self.leaves]
            layer_norms = torch.full((len(self.layer_names),), math.nan, dtype=mean.dtype, device=mean.device)
            gradient_norm = torch.tensor(math.nan, dtype=mean.dtype, device=mean.device)
            max_gradient = torch.tensor(math.inf)
        elif full:
            # a full-batch step's gradient is the training objective's: dropout on, when there is any
            self.model.network.train()
            with torch.enable_grad():
                mean = self.mean_nll(self.observations)
                grads = torch.autograd.grad(mean, self.leaves, allow_unused=True)
            grads = [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, self.leaves, strict=True)]
            for leaf, gradient in zip(self.leaves, grads, strict=True):
                leaf.grad = gradient
            layer_norms = self._layer_norms()
            mean = mean.detach()
            largest = torch.stack([g.abs().max() for g in grads]).max()
            gradient_norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))
            max_gradient = largest
        else:
            mean, layer_norms = self.epoch["mean_nll"], self.epoch["layer_norms"]
            grads = [torch.zeros_like(p) for p in self.leaves]
            gradient_norm = torch.linalg.vector_norm(layer_norms)
            # the gradient test needs the gradient of the whole objective, which mini-batches never take
            max_gradient = torch.tensor(math.inf)
        validation = self.validation_nll()
        weight = self.observations.row_weight.to(mean)
        head = torch.stack(
            [
                mean * weight,
                mean,
                gradient_norm.to(mean),
                torch.tensor(self.lr, dtype=mean.dtype, device=mean.device),
                validation.to(mean),
            ]
        )
        columns = torch.cat([head, layer_norms.to(mean)]).reshape(1, -1) if trace else None
        finite = torch.isfinite(mean).reshape(1)
        return StepValues(
            rows,
            mean.reshape(1),
            max_gradient.reshape(1).double().cpu(),
            [grads],
            columns,
            finite,
            {"validation": float(validation)},
        )

    def train_epoch(self, optimizer: torch.optim.Optimizer, generator: torch.Generator) -> None:
        """One pass of shuffled mini-batches, an optimiser step each."""
        observations, size = self.observations, self.training.batch_size
        count = observations.n_rows
        order = torch.randperm(count, generator=generator).to(observations.device)
        self.model.network.train()
        # the epoch's NLL accumulates on the device: one operation a batch, no synchronisation
        total = torch.zeros((), dtype=observations.dtype, device=observations.device)
        weight = torch.zeros_like(total)
        for start in range(0, count, size):
            batch = observations.select(order[start : start + size])
            optimizer.zero_grad(set_to_none=True)
            rows = _total_weight(batch)
            mean = self.mean_nll(batch)
            mean.backward()
            if self.training.clip is not None:
                nn.utils.clip_grad_norm_(self.leaves, self.training.clip)
            optimizer.step()
            if isinstance(rows, int):
                total.add_(mean.detach(), alpha=rows)
                weight.add_(rows)
            else:
                total.add_(mean.detach() * rows)
                weight.add_(rows)
        self.epoch = {"mean_nll": total / weight, "layer_norms": self._layer_norms()}

    def state(self) -> list[Tensor]:
        return [leaf.detach().clone() for leaf in self.leaves]

    def restore(self, state: Sequence[Tensor]) -> None:
        with torch.no_grad():
            for leaf, value in zip(self.leaves, state, strict=True):
                leaf.copy_(value)


class EpochStep:
    """One epoch per step: torch's optimiser over the network (AdamW for `adam`, so weight decay is
    decoupled; SGD; L-BFGS in full batch only), the learning-rate schedule, early stopping on the
    validation NLL (the best epoch's weights are kept, see `best`)."""

    def __init__(self, problem: NetworkProblem, optimizer: str, lr: float, epochs: int):
        training = problem.training
        parameters = problem.leaves
        if optimizer == "adam":
            self.optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=training.weight_decay)
        elif optimizer == "sgd":
            self.optimizer = torch.optim.SGD(parameters, lr=lr, weight_decay=training.weight_decay)
        elif optimizer == "lbfgs":
            check_training(optimizer, training, problem.model.architecture.dropout)
            self.optimizer = lbfgs(parameters, lr)
        else:
            raise InputError(f"unknown optimizer {optimizer!r}; valid: lbfgs, adam, sgd")
        self.kind = optimizer
        self.scheduler = None
        if training.scheduler == "plateau":
            self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
                self.optimizer, patience=max(1, training.patience // 4)
            )
        elif training.scheduler == "cosine":
            self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=epochs)
        self.generator = torch.Generator().manual_seed(training.seed)
        self.best_validation, self.best_state, self.waited = math.inf, problem.state(), 0
        problem.lr = lr

    def step(self, problem: NetworkProblem, current: StepValues, rows: Tensor, step: int):
        validation = current.extras["validation"]
        if problem.validation is not None:
            if validation < self.best_validation:
                self.best_validation, self.best_state, self.waited = validation, problem.state(), 0
            else:
                self.waited += 1
                if self.waited >= problem.training.patience:
                    return [
                        (
                            0,
                            Outcome.EARLY_STOPPED,
                            f"early stop: validation NLL did not improve for {self.waited} epochs",
                        )
                    ]
        if problem.training.batch_size is None:
            self._full_batch(problem, current)
        else:
            problem.train_epoch(self.optimizer, self.generator)
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.scheduler.step(validation if math.isfinite(validation) else float(current.mean_nll[0]))
        elif self.scheduler is not None:
            self.scheduler.step()
        problem.lr = float(self.optimizer.param_groups[0]["lr"])
        return []

    def _full_batch(self, problem: NetworkProblem, current: StepValues) -> None:
        for leaf, gradient in zip(problem.leaves, current.gradients[0], strict=True):
            leaf.grad = gradient
        if self.kind != "lbfgs":
            self.optimizer.step()
            return
        cached = [current]

        def closure() -> Tensor:
            evaluation = cached.pop() if cached else problem.evaluate(torch.tensor([0]))
            for leaf, gradient in zip(problem.leaves, evaluation.gradients[0], strict=True):
                leaf.grad = gradient
            return evaluation.mean_nll[0]

        self.optimizer.step(closure)


def network_model_for(
    family: Family,
    terms: str,
    targets: Sequence[str],
    architecture: Architecture,
    formulas: Mapping[str, str],
    links: Mapping[str, str],
    fixed: Mapping[str, float],
    init: Mapping[str, float],
    covariates: pd.DataFrame,
    observations: Observations,
    seed: int,
) -> NetworkModel:
    """The network model a spec asks for on a data set: the parametrisation its names choose, the
    network's inputs from `terms`, its `targets` (default: every free parameter without a formula),
    a linear predictor (formula or intercept) for every other free parameter; everything checked."""
    from nllflow.data.formulas import build_design
    from nllflow.models.linear import checked_parametrisation, predictor_designs

    parametrisation = checked_parametrisation(family, formulas, [*targets, *fixed, *init, *links], fixed, observations)
    names = parameter_names(family, parametrisation)
    free = [name for name in names if name not in fixed]
    for name in targets:
        if name in fixed:
            raise InputError(f"{name} is fixed (--fix) and an output of the network: give one or the other")
        if name in formulas:
            raise InputError(f"{name} has a formula and is an output of the network: give one or the other")
    outputs = list(targets) or [name for name in free if name not in formulas]
    if not outputs:
        raise InputError(
            f"the network has no parameter of {family.name} to output: "
            + ("every one is fixed" if not free else "every free one has a formula")
        )
    designs = predictor_designs([n for n in free if n not in outputs], formulas, covariates, observations)
    inputs = build_design("network", terms, covariates)
    return NetworkModel(
        family,
        parametrisation,
        inputs,
        architecture,
        outputs,
        designs,
        links,
        {name: float(value) for name, value in fixed.items()},
        seed,
    )
