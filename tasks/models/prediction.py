"""Predictions of a fitted parameter model for new rows: each row's natural parameters, its mean and
the requested quantiles, from the covariates alone.

`FittedModel` is what a fit leaves to predict with and what an MLflow model stores: the family, the
parametrisation, the fixed values and, per free parameter with a linear predictor, its formula, link
and coefficients on the original scale (with formulaic's encoding of the training data: categorical
levels, transform state); for a network, also its architecture, its inputs' terms and
standardisation, the parameters it outputs with their links, and its weights (`network.pt`).
"""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch

from nllflow.data.formulas import Design
from nllflow.errors import InputError
from nllflow.families import get_family
from nllflow.likelihood.quantiles import quantiles
from nllflow.models.links import LINKS

STATE_FILE, SPECS_FILE, WEIGHTS_FILE = "model.json", "designs.pkl", "network.pt"


@dataclass
class FittedModel:
    """A fitted linear or network parameter model, independent of the data it was fitted on."""

    family: str
    parametrisation: str | None
    fixed: dict[str, float]
    formulas: dict[str, str]
    links: dict[str, str]
    columns: dict[str, list[str]]
    coefficients: dict[str, list[float]]
    specs: dict[str, Any] = field(default_factory=dict, repr=False)
    response: str = ""
    # a network: {terms, columns, input_columns, centre, spread, targets, links, output_scale, architecture}
    network: dict[str, Any] | None = None
    weights: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    @staticmethod
    def of(result, response: str = "") -> FittedModel:
        """The fitted model of a regression's or a network's FitResult."""
        model = result.model
        key = next((k for k, p in model.family.parametrisations.items() if p is model.parametrisation), None)
        coefficients = {}
        for name in model.predictors:
            standardised = result.standardised[name].reshape(1, -1)
            coefficients[name] = model.original(name, standardised)[0].tolist()
        network, weights, specs = None, {}, {}
        if model.kind == "network":
            network = {
                "terms": model.inputs.formula,
                "columns": list(model.inputs.columns),
                "input_columns": list(model.input_columns),
                "centre": model.input_centre.tolist(),
                "spread": model.input_spread.tolist(),
                "targets": list(model.targets),
                "links": {name: link.name for name, link in model.links.items()},
                "output_scale": model.output_scale.tolist(),
                "architecture": model.architecture.describe(),
            }
            weights = {k: v.detach().double().cpu().clone() for k, v in model.network.state_dict().items()}
            specs["network"] = model.inputs.spec
        return FittedModel(
            family=model.family.name,
            parametrisation=key,
            fixed=dict(model.fixed),
            formulas={name: p.design.formula for name, p in model.predictors.items()},
            links={name: p.link.name for name, p in model.predictors.items()},
            columns={name: list(p.design.columns) for name, p in model.predictors.items()},
            coefficients=coefficients,
            specs={
                **{name: p.design.spec for name, p in model.predictors.items() if p.design.spec is not None},
                **specs,
            },
            response=response,
            network=network,
            weights=weights,
        )

    @property
    def covariates(self) -> list[str]:
        """The columns new data must have."""
        from nllflow.data.formulas import required_columns

        texts = [text for text in self.formulas.values() if text != "1"]
        if self.network is not None:
            texts.append(self.network["terms"])
        return sorted({c for text in texts for c in required_columns(text)})

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v for k, v in self.__dict__.items() if k not in ("specs", "weights", "_module")}
        (folder / STATE_FILE).write_text(json.dumps(state, indent=2))
        (folder / SPECS_FILE).write_bytes(pickle.dumps(self.specs))
        if self.network is not None:
            torch.save(self.weights, folder / WEIGHTS_FILE)

    @staticmethod
    def load(folder: Path) -> FittedModel:
        state = json.loads((folder / STATE_FILE).read_text())
        # formulaic's own encoding of the training data, written by `save` of a run of this store
        specs = pickle.loads((folder / SPECS_FILE).read_bytes())  # noqa: S301
        weights = torch.load(folder / WEIGHTS_FILE, weights_only=True) if state.get("network") else {}
        return FittedModel(**state, specs=specs, weights=weights)

    def _network_outputs(self, frame: pd.DataFrame) -> dict[str, torch.Tensor]:
        """The network's parameters per row of `frame` (the weights loaded into the architecture
        once, in float64 and evaluation mode)."""
        from nllflow.models.network import Architecture

        network = self.network
        if getattr(self, "_module", None) is None:
            architecture = network["architecture"]
            module = Architecture(
                architecture["name"], tuple(architecture["hidden"]), architecture["activation"], architecture["dropout"]
            ).build(len(network["input_columns"]), len(network["targets"]))
            module = module.double()  # before loading: a float32 module would round the weights
            module.load_state_dict(self.weights)
            self._module = module.eval()
        design = Design("network", network["terms"], network["columns"], np.empty((0, 0)), self.specs["network"])
        matrix = design.encode(frame)
        keep = [network["columns"].index(c) for c in network["input_columns"]]
        inputs = (matrix[:, keep] - np.asarray(network["centre"])) / np.asarray(network["spread"])
        with torch.no_grad():
            out = self._module(torch.as_tensor(inputs, dtype=torch.float64)) * torch.tensor(
                network["output_scale"], dtype=torch.float64
            )
        return {name: LINKS[network["links"][name]].inverse(out[:, j]) for j, name in enumerate(network["targets"])}

    def parameters(self, frame: pd.DataFrame) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Per row of `frame`: the parametrisation's values and the family's natural parameters."""
        missing = [c for c in self.covariates if c not in frame.columns]
        if missing:
            raise InputError(
                f"the data lacks the column(s) {', '.join(missing)} that the model reads; "
                f"needed: {', '.join(self.covariates)}"
            )
        rows = len(frame)
        values = {}
        for name, formula in self.formulas.items():
            if formula == "1":
                matrix = np.ones((rows, 1))
            else:
                matrix = Design(name, formula, self.columns[name], np.empty((0, 0)), self.specs[name]).encode(frame)
            eta = torch.as_tensor(matrix) @ torch.tensor(self.coefficients[name], dtype=torch.float64)
            values[name] = LINKS[self.links[name]].inverse(eta)
        if self.network is not None:
            values.update(self._network_outputs(frame))
        for name, value in self.fixed.items():
            values[name] = torch.full((rows,), float(value), dtype=torch.float64)
        family = get_family(self.family)
        if self.parametrisation is None:
            return values, dict(values)
        return values, family.parametrisations[self.parametrisation].to_natural(values)

    def predict(self, frame: pd.DataFrame, probabilities: Sequence[float] = ()) -> pd.DataFrame:
        """Per row: the family's natural parameters, the parametrisation's values, the mean and one
        column `q<p>` per probability."""
        for p in probabilities:
            if not 0 < p < 1:
                raise InputError(f"quantiles are probabilities in (0, 1), got {p}")
        family = get_family(self.family)
        values, natural = self.parameters(frame)
        columns: dict[str, Any] = {name: value.numpy() for name, value in natural.items()}
        columns.update({name: value.numpy() for name, value in values.items() if name not in columns})
        dist = family.build(**natural, validate_args=False)
        try:
            columns["mean"] = dist.mean.detach().numpy()
        except NotImplementedError:
            columns["mean"] = np.full(len(frame), np.nan)
        if probabilities:
            spread = np.nan_to_num(dist.stddev.detach().numpy(), nan=1.0, posinf=1.0) if _has_stddev(dist) else 1.0
            centre = np.nan_to_num(columns["mean"], nan=0.0, posinf=0.0, neginf=0.0)
            found = quantiles(
                family,
                dist,
                list(probabilities),
                torch.as_tensor(centre - 10 * spread),
                torch.as_tensor(centre + 10 * spread),
            ).numpy()
            for p, row in zip(probabilities, found, strict=True):
                columns[f"q{p:g}"] = row
        return pd.DataFrame(columns, index=frame.index)


def _has_stddev(dist) -> bool:
    try:
        return dist.stddev is not None
    except NotImplementedError:
        return False
