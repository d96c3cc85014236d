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
import torch

from tasks.errors import InputError
from tasks.families import Family
from tasks.fitting import Observations, ParamValue, flat_labels

READERS = {".csv": "CSV", ".parquet": "Parquet", ".pq": "Parquet"}


@dataclass(frozen=True)
class Sample:
    """One data set: float64 values, optional frequency weights, where it came from, and the
    true parameters when it was simulated."""

    values: np.ndarray
    source: str
    weights: np.ndarray | None = None
    truth: Mapping[str, float] | None = None

    @property
    def n(self) -> int:
        return len(self.values)

    @cached_property
    def fingerprint(self) -> str:
        digest = hashlib.sha256(np.ascontiguousarray(self.values).tobytes())
        if self.weights is not None:
            digest.update(np.ascontiguousarray(self.weights).tobytes())
        return digest.hexdigest()[:16]

    def summary(self) -> dict[str, float]:
        v = self.values
        return {"n": float(len(v)), "mean": float(v.mean()), "std": float(v.std()),
                "min": float(v.min()), "max": float(v.max())}

    def observations(self, dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu") -> Observations:
        values = torch.as_tensor(self.values, dtype=dtype, device=device)
        weights = None if self.weights is None else torch.as_tensor(self.weights, dtype=dtype, device=device)
        return Observations(values, weights)

    def split(self, fraction: float, seed: int) -> tuple[Sample, Sample]:
        """A random training/held-out split; `fraction` of the points are held out."""
        order = np.random.default_rng(seed).permutation(self.n)
        cut = self.n - int(round(fraction * self.n))
        parts = []
        for index, label in ((np.sort(order[:cut]), "train"), (np.sort(order[cut:]), "heldout")):
            weights = None if self.weights is None else self.weights[index]
            parts.append(Sample(self.values[index], f"{self.source} ({label})", weights, self.truth))
        return parts[0], parts[1]


def _read_table(path: Path, columns: list[str]) -> pd.DataFrame:
    if not path.is_file():
        raise InputError(f"data file not found: {path}")
    kind = READERS.get(path.suffix.lower())
    if kind is None:
        raise InputError(f"unsupported data file extension {path.suffix!r} for {path}; valid: {', '.join(READERS)}")
    try:
        header = pd.read_csv(path, nrows=0) if kind == "CSV" else pd.read_parquet(path).iloc[:0]
    except Exception as error:  # pandas/pyarrow raise many types for a malformed file
        raise InputError(f"cannot read {path} as {kind}: {_first_line(error)}") from None
    missing = [c for c in columns if c not in header.columns]
    if missing:
        raise InputError(
            f"column {missing[0]!r} not found in {path}; columns: {', '.join(map(str, header.columns)) or '(none)'}"
        )
    try:
        return pd.read_csv(path, usecols=columns) if kind == "CSV" else pd.read_parquet(path, columns=columns)
    except Exception as error:
        raise InputError(f"cannot read {path} as {kind}: {_first_line(error)}") from None


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def numeric_column(frame: pd.DataFrame, column: str, where: str) -> np.ndarray:
    """The column as finite float64 values, or an InputError that says what is wrong with it."""
    series = frame[column]
    if len(series) == 0:
        raise InputError(f"column {column!r} in {where} is empty")
    if series.dtype == bool or not pd.api.types.is_numeric_dtype(series):
        coerced = pd.to_numeric(series, errors="coerce")
        bad = series[coerced.isna() & series.notna()]
        if len(bad):
            raise InputError(
                f"column {column!r} in {where} is not numeric ({len(bad)} non-numeric value(s), e.g. {bad.iloc[0]!r})"
            )
        series = coerced
    values = series.to_numpy(dtype=np.float64, na_value=np.nan)
    missing, infinite = int(np.isnan(values).sum()), int(np.isinf(values).sum())
    if missing or infinite:
        first = int(np.flatnonzero(~np.isfinite(values))[0])
        raise InputError(
            f"column {column!r} in {where} has {missing} missing/NaN and {infinite} infinite value(s) "
            f"out of {len(values)} (first at row {first}); drop or impute them first"
        )
    return values


def load_sample(path: str | Path, column: str, weights: str | None = None) -> Sample:
    """Read `column` (and the optional `weights` column) from a CSV or Parquet file."""
    path = Path(path)
    frame = _read_table(path, [column] + ([weights] if weights else []))
    values = numeric_column(frame, column, str(path))
    weight_values = None
    if weights:
        weight_values = numeric_column(frame, weights, str(path))
        if (weight_values < 0).any():
            raise InputError(f"weights column {weights!r} in {path} has negative values; weights must be >= 0")
        if weight_values.sum() <= 0:
            raise InputError(f"weights column {weights!r} in {path} sums to 0")
    return Sample(values, f"{path}#{column}", weight_values)


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
    """Refuse data the family cannot describe: empty, constant, or outside its support."""
    values = sample.values
    if len(values) == 0:
        raise InputError(f"no data in {sample.source}")
    if len(values) < 2 or values.min() == values.max():
        raise InputError(
            f"all {len(values)} value(s) in {sample.source} equal {values[0]:g}: "
            "a family cannot be fitted to constant data"
        )
    inside = family.data_support.check(torch.as_tensor(values)).numpy()
    if not inside.all():
        outside = values[~inside]
        raise InputError(
            f"{len(outside)} of {len(values)} values in {sample.source} are outside the support of "
            f"{family.name} ({family.data_support}), e.g. {outside[0]:g}"
        )
