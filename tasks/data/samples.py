"""Samples: a numeric column read from Parquet or CSV (with the covariate columns a regression reads),
or simulated from a family with a known truth; checked against the family's support before anything
is fitted."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch

from nllflow.errors import InputError
from nllflow.families import Family
from nllflow.likelihood.censoring import CensoredRows
from nllflow.likelihood.observations import Observations
from nllflow.models.constant import ParamValue, flat_labels

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
    # the file it was read from (None when simulated)
    path: str | None = None
    # the covariates of a regression, one row per observation: the exact rows, then the censored rows
    covariates: pd.DataFrame | None = None
    # rows left out because a column they need was missing (--drop-missing)
    dropped: int = 0

    @property
    def name(self) -> str:
        """A short name for the data set: the file's stem and column, or the simulated family."""
        if self.path is not None:
            return f"{Path(self.path).stem}#{self.source.rsplit('#', 1)[-1]}"
        return self.source.split("(", 1)[0].strip()

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
        if self.covariates is not None:
            digest.update(",".join(map(str, self.covariates.columns)).encode())
            digest.update(pd.util.hash_pandas_object(self.covariates, index=False).to_numpy().tobytes())
        return digest.hexdigest()[:16]

    def stand_in(self) -> np.ndarray:
        """The exact values and one point per censored row (see CensoredRows.stand_in_values)."""
        if self.censored_low is None:
            return self.values
        rows = CensoredRows(torch.as_tensor(self.censored_low), torch.as_tensor(self.censored_high))
        return np.concatenate([self.values, rows.stand_in_values().numpy()])

    def summary(self) -> dict[str, float]:
        v = self.stand_in()
        summary = {
            "n": float(self.n),
            "mean": float(v.mean()),
            "std": float(v.std()),
            "min": float(v.min()),
            "max": float(v.max()),
        }
        if self.censored_low is not None:
            summary["censored"] = float(self.n_censored)
        return summary

    def kept(self) -> tuple[np.ndarray, np.ndarray]:
        """Which exact and which censored rows observations() keeps: a frequency weight of 0 is no row."""
        exact = np.ones(len(self.values), bool) if self.weights is None else self.weights > 0
        censored = np.ones(self.n_censored, bool) if self.censored_weights is None else self.censored_weights > 0
        return exact, censored

    def observations(
        self,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str = "cpu",
        features: Mapping[str, np.ndarray] | None = None,
    ) -> Observations:
        """The sample as tensors, with `features` (matrices with one row per row of the sample, in
        its order: exact, then censored) beside them; rows of weight 0 are left out."""
        keep_exact, keep_censored = self.kept()

        def tensor(array: np.ndarray | None, keep: np.ndarray) -> torch.Tensor | None:
            if array is None:
                return None
            return torch.as_tensor(array[keep], dtype=dtype, device=device)

        rows = None
        if self.censored_low is not None:
            rows = CensoredRows(
                tensor(self.censored_low, keep_censored),
                tensor(self.censored_high, keep_censored),
                tensor(self.censored_weights, keep_censored),
            )
        keep = np.concatenate([keep_exact, keep_censored])
        tensors = {
            name: torch.as_tensor(matrix[keep], dtype=dtype, device=device) for name, matrix in (features or {}).items()
        }
        return Observations(tensor(self.values, keep_exact), tensor(self.weights, keep_exact), rows, tensors)

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

            covariates = None
            if self.covariates is not None:
                covariates = self.covariates.iloc[np.concatenate([rows, exact + censored])].reset_index(drop=True)
            parts.append(
                Sample(
                    self.values[rows],
                    f"{self.source} ({label})",
                    pick(self.weights, rows),
                    self.truth,
                    pick(self.censored_low, censored),
                    pick(self.censored_high, censored),
                    pick(self.censored_weights, censored),
                    self.path,
                    covariates,
                    self.dropped,
                )
            )
        return parts[0], parts[1]


def read_table(path: Path, columns: list[str] | None = None) -> pd.DataFrame:
    """`columns` of a CSV or Parquet file (all of them when None); every problem an InputError."""
    if not path.is_file():
        raise InputError(f"data file not found: {path}")
    kind = READERS.get(path.suffix.lower())
    if kind is None:
        raise InputError(f"unsupported data file extension {path.suffix!r} for {path}; valid: {', '.join(READERS)}")
    try:
        names = list(pd.read_csv(path, nrows=0).columns) if kind == "CSV" else pq.read_schema(path).names
    except Exception as error:  # pandas/pyarrow raise many types for a malformed file
        raise InputError(f"cannot read {path} as {kind}: {_first_line(error)}") from None
    columns = list(names) if columns is None else columns
    _check_columns(names, columns, str(path))
    try:
        if kind == "CSV":
            # pyarrow refuses a row with more or fewer fields than the header; pandas' own parser,
            # given usecols, silently reads the row's first fields
            return pd.read_csv(path, usecols=columns, engine="pyarrow")
        return pd.read_parquet(path, columns=columns)
    except Exception as error:
        raise InputError(f"cannot read {path} as {kind}: {_first_line(error)}") from None


def _check_columns(names: Sequence[Any], columns: Sequence[str], where: str) -> None:
    missing = [c for c in columns if c not in names]
    if missing:
        raise InputError(
            f"column {missing[0]!r} not found in {where}; columns: {', '.join(map(str, names)) or '(none)'}"
        )


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


def _weights(frame: pd.DataFrame, weights: str | None, where: str) -> np.ndarray | None:
    if not weights:
        return None
    values = numeric_column(frame, weights, where)
    if (values < 0).any():
        raise InputError(f"weights column {weights!r} in {where} has negative values; weights must be >= 0")
    if values.sum() <= 0:
        raise InputError(f"weights column {weights!r} in {where} sums to 0")
    return values


def _complete_rows(frame: pd.DataFrame, checked: list[str], drop_missing: bool, where: str) -> tuple[pd.DataFrame, int]:
    """The rows with a value in every `checked` column; a missing one is refused (naming the column
    and how many) unless `drop_missing`, which drops those rows (and says how many)."""
    missing = frame[checked].isna() if checked else pd.DataFrame(index=frame.index)
    if not checked or not missing.to_numpy().any():
        return frame, 0
    if not drop_missing:
        column = next(c for c in checked if missing[c].any())
        count, first = int(missing[column].sum()), int(np.flatnonzero(missing[column].to_numpy())[0])
        raise InputError(
            f"column {column!r} in {where} has {count} missing value(s) (first at row {first}); "
            "give --drop-missing (data.drop_missing: true) to leave those rows out, or impute them"
        )
    complete = ~missing.any(axis=1)
    return frame[complete].reset_index(drop=True), int((~complete).sum())


def load_sample(
    path: str | Path,
    column: str,
    weights: str | None = None,
    covariates: list[str] | tuple = (),
    drop_missing: bool = False,
) -> Sample:
    """Read `column` (and the optional `weights` column and `covariates`) from a CSV or Parquet file."""
    path = Path(path)
    extra = [c for c in dict.fromkeys(covariates) if c not in (column, weights)]
    frame = read_table(path, [column] + ([weights] if weights else []) + extra)
    return _column_sample(frame, column, weights, str(path), f"{path}#{column}", str(path), covariates, drop_missing)


def _column_sample(
    frame: pd.DataFrame,
    column: str,
    weights: str | None,
    where: str,
    source: str,
    path: str | None = None,
    covariates: Sequence[str] = (),
    drop_missing: bool = False,
) -> Sample:
    extra = [c for c in dict.fromkeys(covariates) if c not in (column, weights)]
    # a missing response is counted with its infinite values below, unless it is to be dropped
    checked = ([column] if drop_missing else []) + ([weights] if weights else []) + extra
    frame, dropped = _complete_rows(frame, checked, drop_missing, where)
    values = numeric_column(frame, column, where)
    return Sample(
        values,
        source,
        _weights(frame, weights, where),
        path=path,
        covariates=frame[list(covariates)].reset_index(drop=True) if covariates else None,
        dropped=dropped,
    )


def load_censored_sample(
    path: str | Path,
    left: str,
    right: str,
    weights: str | None = None,
    covariates: Sequence[str] = (),
    drop_missing: bool = False,
) -> Sample:
    """Read censored rows from the columns `left` and `right` in fitdistrplus's convention: equal
    values are an exact observation, a missing left a row left-censored at right, a missing right a
    row right-censored at left, and two different values an interval (left, right]."""
    path = Path(path)
    extra = [c for c in dict.fromkeys(covariates) if c not in (left, right, weights)]
    frame = read_table(path, list(dict.fromkeys([left, right] + ([weights] if weights else []) + extra)))
    return _censored_sample(
        frame, left, right, weights, str(path), f"{path}#{left},{right}", str(path), covariates, drop_missing
    )


def _censored_sample(
    frame: pd.DataFrame,
    left: str,
    right: str,
    weights: str | None,
    where: str,
    source: str,
    path: str | None = None,
    covariates: Sequence[str] = (),
    drop_missing: bool = False,
) -> Sample:
    extra = [c for c in dict.fromkeys(covariates) if c not in (left, right, weights)]
    # an empty bound is a censored row's meaning, not a missing value
    frame, dropped = _complete_rows(frame, ([weights] if weights else []) + extra, drop_missing, where)
    low = numeric_column(frame, left, where, allow_missing=True)
    high = numeric_column(frame, right, where, allow_missing=True)
    for name, column, wrong in ((left, low, np.inf), (right, high, -np.inf)):
        bad = np.flatnonzero(column == wrong)
        if len(bad):
            raise InputError(
                f"column {name!r} in {where} holds {column[bad[0]]:g} at row {bad[0]}; "
                "leave a censored bound empty instead"
            )
    low, high = np.where(np.isnan(low), -np.inf, low), np.where(np.isnan(high), np.inf, high)
    both = np.flatnonzero(np.isinf(low) & np.isinf(high))
    if len(both):
        raise InputError(
            f"row {both[0]} of {where} has neither {left!r} nor {right!r} "
            f"({len(both)} such row(s)): a row needs at least one bound"
        )
    reversed_rows = np.flatnonzero(low > high)
    if len(reversed_rows):
        row = reversed_rows[0]
        raise InputError(
            f"row {row} of {where} has {left}={low[row]:g} > {right}={high[row]:g} "
            f"({len(reversed_rows)} such row(s)): {left!r} must be <= {right!r}"
        )
    weight_values = _weights(frame, weights, where)
    exact = low == high
    censored_weights = None if weight_values is None else weight_values[~exact]
    covariate_rows = None
    if covariates:
        order = np.concatenate([np.flatnonzero(exact), np.flatnonzero(~exact)])
        covariate_rows = frame[list(covariates)].iloc[order].reset_index(drop=True)
    return Sample(
        low[exact],
        source,
        None if weight_values is None else weight_values[exact],
        censored_low=low[~exact],
        censored_high=high[~exact],
        censored_weights=censored_weights,
        path=path,
        covariates=covariate_rows,
        dropped=dropped,
    )


def memory_sample(
    data: Any,
    column: str | None = None,
    weights: Any = None,
    censored: Sequence[str] | None = None,
    covariates: Sequence[str] = (),
    drop_missing: bool = False,
) -> Sample:
    """Data handed over in memory (the Python API), checked as a file's columns are: a pandas
    DataFrame (its `column`, or `censored` = [LEFT, RIGHT] in fitdistrplus's convention, and
    optionally a `weights` column), or one dimension of values (a NumPy array or anything
    array-like, a pandas Series, a torch tensor) with `weights` as values of the same length."""
    if isinstance(data, pd.DataFrame):
        where = "the DataFrame"
        if weights is not None and not isinstance(weights, str):
            raise InputError("weights of a DataFrame name its weights column (weights='w')")
        extra = [weights] if weights else []
        if censored is not None:
            if isinstance(censored, str) or len(censored) != 2 or censored[0] == censored[1]:
                raise InputError(f"censored needs two different columns [LEFT, RIGHT], got {censored!r}")
            left, right = censored
            _check_columns(list(data.columns), [left, right, *extra, *covariates], where)
            source = f"DataFrame columns {left!r}, {right!r}"
            return _censored_sample(data, left, right, weights, where, source, None, covariates, drop_missing)
        if column is None:
            if data.shape[1] != 1:
                names = ", ".join(map(str, data.columns)) or "(none)"
                raise InputError(f"the DataFrame has {data.shape[1]} columns ({names}): name one with column=")
            column = data.columns[0]
        _check_columns(list(data.columns), [column, *extra, *covariates], where)
        source = f"DataFrame column {column!r}"
        return _column_sample(data, column, weights, where, source, None, covariates, drop_missing)
    if column is not None or censored is not None or covariates:
        raise InputError(
            f"column=, censored= and formulas name columns of a DataFrame; the data are a {type(data).__name__}"
        )
    kind, values = _one_dimension(data, "data")
    name = str(data.name) if isinstance(data, pd.Series) and data.name is not None else "values"
    frame = pd.DataFrame({name: values})
    weights_column = None
    if weights is not None:
        weights_column = "weights" if name != "weights" else "frequency weights"
        frame[weights_column] = _one_dimension(weights, "weights", len(values))[1]
    source = kind + (f" {name!r}" if name != "values" else "")
    return _column_sample(frame, name, weights_column, f"the {kind}", source)


def write_sample(sample: Sample, folder: Path) -> dict[str, Any]:
    """`sample` as a Parquet file in `folder`, named by its fingerprint (written once), for a flow
    that reads its data from a file; the `data` section of a spec that reads it back: exact values
    in `x`, censored rows as `left`/`right` (fitdistrplus's convention), weights in `weight`."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"memory-{sample.fingerprint}.parquet"
    section: dict[str, Any] = {"path": str(path), "weights": "weight" if sample.weights is not None else None}
    if sample.censored_low is None:
        frame = pd.DataFrame({"x": sample.values})
        section["column"] = "x"
        if sample.weights is not None:
            frame["weight"] = sample.weights
    else:
        low = np.concatenate([sample.values, sample.censored_low])
        high = np.concatenate([sample.values, sample.censored_high])
        # an empty bound is a censored one
        frame = pd.DataFrame(
            {"left": np.where(np.isinf(low), np.nan, low), "right": np.where(np.isinf(high), np.nan, high)}
        )
        section["censored"] = ["left", "right"]
        if sample.weights is not None:  # the exact rows' and the censored rows' weights come together
            frame["weight"] = np.concatenate([sample.weights, sample.censored_weights])
    if not path.is_file():
        partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
        frame.to_parquet(partial, index=False)
        partial.replace(path)  # atomic: a concurrent reader sees the whole file or none
    return section


def _one_dimension(data: Any, what: str, length: int | None = None) -> tuple[str, np.ndarray]:
    """What kind of values `data` holds (for messages) and the values themselves, one dimension."""
    if isinstance(data, torch.Tensor):
        kind, values = "torch tensor", data.detach().cpu().numpy()
    elif isinstance(data, pd.Series):
        kind, values = "pandas Series", data.to_numpy()
    else:  # a NumPy array, or a list or anything else NumPy makes an array of
        kind = "NumPy array" if isinstance(data, np.ndarray) else type(data).__name__
        values = np.asarray(data)
    if values.ndim != 1:
        raise InputError(f"{what} must be one-dimensional, got a {kind} of shape {values.shape}")
    if length is not None and len(values) != length:
        raise InputError(f"{what} has {len(values)} values for {length} data values")
    return kind, values


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
        truth.update(zip(flat_labels(name, tuple(tensor.shape)), tensor.reshape(-1).tolist(), strict=False))
    described = ", ".join(f"{k}={v:g}" for k, v in truth.items())
    return Sample(values, f"simulated {family.name}({described}), n={n}, seed={seed}", truth=truth)


def check_support(family: Family, sample: Sample) -> None:
    """Refuse data the family cannot describe: empty, constant, outside its support, or censored
    rows for a discrete family. A censored row is judged by its midpoint or finite bound."""
    values = sample.stand_in()
    if len(values) == 0:
        raise InputError(f"no data in {sample.source}")
    if sample.n_censored and family.discrete:
        raise InputError(
            f"{sample.source} has censored rows, which need a continuous family; {family.name} is discrete"
        )
    if len(values) < 2 or values.min() == values.max():
        raise InputError(
            f"all {len(values)} value(s) in {sample.source} equal {values[0]:g}: "
            "a family cannot be fitted to constant data"
        )
    inside = family.support.check(torch.tensor(values)).numpy()
    if not inside.all():
        outside = values[~inside]
        raise InputError(
            f"{len(outside)} of {len(values)} values in {sample.source} are outside the support of "
            f"{family.name} ({family.support}), e.g. {outside[0]:g}"
        )
