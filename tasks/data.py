"""Samples: a numeric column read from Parquet or CSV, or simulated from a family with a known
truth; checked against the family's support before anything is fitted."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Mapping

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch

from tasks.censoring import CensoredRows
from tasks.errors import InputError
from tasks.families import Family
from tasks.fitting import Observations, ParamValue, flat_labels

READERS = {".csv": "CSV", ".parquet": "Parquet", ".pq": "Parquet"}


@dataclass(frozen=True)
class Sample:
    """One data set: float64 values, optional frequency weights, where it came from, and the
    true parameters when it was simulated. Censored rows, known only to lie in (low, high], sit
    beside the exact `values`: low = -inf is left-censored at high, high = +inf right-censored at
    low; `censored_weights` are their frequency weights."""

    values: np.ndarray
    source: str
    weights: np.ndarray | None = None
    truth: Mapping[str, float] | None = None
    censored_low: np.ndarray | None = None
    censored_high: np.ndarray | None = None
    censored_weights: np.ndarray | None = None

    @property
    def n(self) -> int:
        return len(self.values) + self.n_censored

    @property
    def n_censored(self) -> int:
        return 0 if self.censored_low is None else len(self.censored_low)

    @cached_property
    def fingerprint(self) -> str:
        digest = hashlib.sha256(np.ascontiguousarray(self.values).tobytes())
        for part in (self.weights, self.censored_low, self.censored_high, self.censored_weights):
            if part is not None:
                digest.update(np.ascontiguousarray(part).tobytes())
        return digest.hexdigest()[:16]

    def stand_in(self) -> np.ndarray:
        """The exact values and one point per censored row (see CensoredRows.pseudo_values)."""
        if self.censored_low is None:
            return self.values
        rows = CensoredRows(torch.as_tensor(self.censored_low), torch.as_tensor(self.censored_high))
        return np.concatenate([self.values, rows.pseudo_values().numpy()])

    def summary(self) -> dict[str, float]:
        v = self.stand_in()
        summary = {"n": float(self.n), "mean": float(v.mean()), "std": float(v.std()),
                   "min": float(v.min()), "max": float(v.max())}
        if self.censored_low is not None:
            summary["censored"] = float(self.n_censored)
        return summary

    def observations(self, dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu") -> Observations:
        """The sample as tensors; rows of weight 0 are left out (a frequency weight of 0 is no row)."""

        def tensor(array: np.ndarray | None, keep: np.ndarray | None) -> torch.Tensor | None:
            if array is None:
                return None
            return torch.as_tensor(array if keep is None else array[keep], dtype=dtype, device=device)

        keep = None if self.weights is None else self.weights > 0
        observations = Observations(tensor(self.values, keep), tensor(self.weights, keep))
        if self.censored_low is None:
            return observations
        keep = None if self.censored_weights is None else self.censored_weights > 0
        rows = CensoredRows(
            tensor(self.censored_low, keep), tensor(self.censored_high, keep), tensor(self.censored_weights, keep)
        )
        return Observations(observations.values, observations.weights, rows)

    def split(self, fraction: float, seed: int) -> tuple[Sample, Sample]:
        """A random training/held-out split over all rows; `fraction` of them are held out."""
        order = np.random.default_rng(seed).permutation(self.n)
        cut = self.n - int(round(fraction * self.n))
        exact = len(self.values)
        parts = []
        for index, label in ((np.sort(order[:cut]), "train"), (np.sort(order[cut:]), "heldout")):
            rows, censored = index[index < exact], index[index >= exact] - exact

            def pick(array: np.ndarray | None, at: np.ndarray) -> np.ndarray | None:
                return None if array is None else array[at]

            parts.append(
                Sample(
                    self.values[rows], f"{self.source} ({label})", pick(self.weights, rows), self.truth,
                    pick(self.censored_low, censored), pick(self.censored_high, censored),
                    pick(self.censored_weights, censored),
                )
            )
        return parts[0], parts[1]


def _read_table(path: Path, columns: list[str]) -> pd.DataFrame:
    if not path.is_file():
        raise InputError(f"data file not found: {path}")
    kind = READERS.get(path.suffix.lower())
    if kind is None:
        raise InputError(f"unsupported data file extension {path.suffix!r} for {path}; valid: {', '.join(READERS)}")
    try:
        names = list(pd.read_csv(path, nrows=0).columns) if kind == "CSV" else pq.read_schema(path).names
    except Exception as error:  # pandas/pyarrow raise many types for a malformed file
        raise InputError(f"cannot read {path} as {kind}: {_first_line(error)}") from None
    missing = [c for c in columns if c not in names]
    if missing:
        raise InputError(
            f"column {missing[0]!r} not found in {path}; columns: {', '.join(map(str, names)) or '(none)'}"
        )
    try:
        if kind == "CSV":
            # pyarrow refuses a row with more or fewer fields than the header; pandas' own parser,
            # given usecols, silently reads the row's first fields
            return pd.read_csv(path, usecols=columns, engine="pyarrow")
        return pd.read_parquet(path, columns=columns)
    except Exception as error:
        raise InputError(f"cannot read {path} as {kind}: {_first_line(error)}") from None


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def numeric_column(frame: pd.DataFrame, column: str, where: str, allow_missing: bool = False) -> np.ndarray:
    """The column as finite float64 values, or an InputError that says what is wrong with it.
    `allow_missing` keeps missing and infinite values (as NaN and ±inf) for the caller to judge."""
    series = frame[column]
    if len(series) == 0:
        raise InputError(f"column {column!r} in {where} is empty")
    if not pd.api.types.is_numeric_dtype(series):
        coerced = pd.to_numeric(series, errors="coerce")
        bad = series[coerced.isna() & series.notna()]
        if len(bad):
            raise InputError(
                f"column {column!r} in {where} is not numeric ({len(bad)} non-numeric value(s), e.g. {bad.iloc[0]!r})"
            )
        series = coerced
    # a copy: pandas hands out a read-only view, and torch warns (on stderr) on every such array
    values = series.to_numpy(dtype=np.float64, na_value=np.nan, copy=True)
    missing, infinite = int(np.isnan(values).sum()), int(np.isinf(values).sum())
    if (missing or infinite) and not allow_missing:
        first = int(np.flatnonzero(~np.isfinite(values))[0])
        raise InputError(
            f"column {column!r} in {where} has {missing} missing/NaN and {infinite} infinite value(s) "
            f"out of {len(values)} (first at row {first}); drop or impute them first"
        )
    return values


def _weights(frame: pd.DataFrame, weights: str | None, path: Path) -> np.ndarray | None:
    if not weights:
        return None
    values = numeric_column(frame, weights, str(path))
    if (values < 0).any():
        raise InputError(f"weights column {weights!r} in {path} has negative values; weights must be >= 0")
    if values.sum() <= 0:
        raise InputError(f"weights column {weights!r} in {path} sums to 0")
    return values


def load_sample(path: str | Path, column: str, weights: str | None = None) -> Sample:
    """Read `column` (and the optional `weights` column) from a CSV or Parquet file."""
    path = Path(path)
    frame = _read_table(path, [column] + ([weights] if weights else []))
    values = numeric_column(frame, column, str(path))
    return Sample(values, f"{path}#{column}", _weights(frame, weights, path))


def load_censored_sample(path: str | Path, left: str, right: str, weights: str | None = None) -> Sample:
    """Read censored rows from the columns `left` and `right` in fitdistrplus's convention: equal
    values are an exact observation, a missing left a row left-censored at right, a missing right a
    row right-censored at left, and two different values an interval (left, right]."""
    path = Path(path)
    frame = _read_table(path, list(dict.fromkeys([left, right] + ([weights] if weights else []))))
    low = numeric_column(frame, left, str(path), allow_missing=True)
    high = numeric_column(frame, right, str(path), allow_missing=True)
    for name, column, wrong in ((left, low, np.inf), (right, high, -np.inf)):
        bad = np.flatnonzero(column == wrong)
        if len(bad):
            raise InputError(f"column {name!r} in {path} holds {column[bad[0]]:g} at row {bad[0]}; "
                             "leave a censored bound empty instead")
    low, high = np.where(np.isnan(low), -np.inf, low), np.where(np.isnan(high), np.inf, high)
    both = np.flatnonzero(np.isinf(low) & np.isinf(high))
    if len(both):
        raise InputError(f"row {both[0]} of {path} has neither {left!r} nor {right!r} "
                         f"({len(both)} such row(s)): a row needs at least one bound")
    reversed_rows = np.flatnonzero(low > high)
    if len(reversed_rows):
        row = reversed_rows[0]
        raise InputError(f"row {row} of {path} has {left}={low[row]:g} > {right}={high[row]:g} "
                         f"({len(reversed_rows)} such row(s)): {left!r} must be <= {right!r}")
    weight_values = _weights(frame, weights, path)
    exact = low == high
    censored_weights = None if weight_values is None else weight_values[~exact]
    return Sample(
        low[exact], f"{path}#{left},{right}", None if weight_values is None else weight_values[exact],
        censored_low=low[~exact], censored_high=high[~exact], censored_weights=censored_weights,
    )


def simulate_sample(family: Family, params: Mapping[str, ParamValue], n: int, seed: int) -> Sample:
    """`n` draws from `family` at `params`, reproducible from `seed`; the truth is kept by label."""
    unknown = sorted(set(params) - set(family.params))
    missing = [p for p in family.params if p not in params]
    if unknown or missing:
        raise InputError(
            f"simulating {family.name} needs exactly the parameters {', '.join(family.params)}; "
            f"got {', '.join(sorted(params)) or 'none'}"
        )
    tensors = {name: torch.as_tensor(value, dtype=torch.float64) for name, value in params.items()}
    try:
        dist = family.build(**tensors, validate_args=True)
    except ValueError as error:
        raise InputError(f"invalid parameters for simulating {family.name}: {_first_line(error)}") from None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        values = dist.sample((n,)).double().numpy()
    truth = {}
    for name, tensor in tensors.items():
        truth.update(zip(flat_labels(name, tuple(tensor.shape)), tensor.reshape(-1).tolist()))
    described = ", ".join(f"{k}={v:g}" for k, v in truth.items())
    return Sample(values, f"simulated {family.name}({described}), n={n}, seed={seed}", truth=truth)


def check_support(family: Family, sample: Sample) -> None:
    """Refuse data the family cannot describe: empty, constant, outside its support, or censored
    rows for a discrete family. A censored row is judged by its midpoint or finite bound."""
    values = sample.stand_in()
    if len(values) == 0:
        raise InputError(f"no data in {sample.source}")
    if sample.n_censored and family.discrete:
        raise InputError(f"{sample.source} has censored rows, which need a continuous family; {family.name} is discrete")
    if len(values) < 2 or values.min() == values.max():
        raise InputError(
            f"all {len(values)} value(s) in {sample.source} equal {values[0]:g}: "
            "a family cannot be fitted to constant data"
        )
    inside = family.data_support.check(torch.tensor(values)).numpy()
    if not inside.all():
        outside = values[~inside]
        raise InputError(
            f"{len(outside)} of {len(values)} values in {sample.source} are outside the support of "
            f"{family.name} ({family.data_support}), e.g. {outside[0]:g}"
        )
