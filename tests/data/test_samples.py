"""Samples: reading CSV and Parquet columns (and every way that can go wrong), support checks,
simulation, splits, fingerprints, and the real ground-beef data."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from family_table import CASES
from hypothesis import given
from hypothesis import strategies as st
from scipy import stats

from nllflow.data.samples import Sample, check_support, load_sample, numeric_column, simulate_sample
from nllflow.errors import InputError
from nllflow.families import get_family
from nllflow.fitting.mle import fit_mle

# --- reading files -------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".pq"])
def test_load_sample_reads_the_column_and_weights(tmp_path, suffix, rng):
    frame = pd.DataFrame({"x": rng.normal(size=50), "w": rng.integers(1, 5, 50).astype(float), "other": ["a"] * 50})
    path = tmp_path / f"data{suffix}"
    frame.to_csv(path, index=False) if suffix == ".csv" else frame.to_parquet(path)
    sample = load_sample(path, "x", weights="w")
    np.testing.assert_array_equal(sample.values, frame["x"].to_numpy())
    np.testing.assert_array_equal(sample.weights, frame["w"].to_numpy())
    assert sample.values.dtype == np.float64 and sample.n == 50 and sample.truth is None
    assert sample.source == f"{path}#x"
    assert load_sample(str(path), "x").weights is None


def test_integer_columns_become_float64(tmp_path):
    path = tmp_path / "counts.parquet"
    pd.DataFrame({"k": np.array([0, 3, 1, 2], dtype=np.int64)}).to_parquet(path)
    sample = load_sample(path, "k")
    assert sample.values.dtype == np.float64 and sample.values.tolist() == [0.0, 3.0, 1.0, 2.0]


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_unknown_column_lists_the_columns(tmp_path, suffix):
    path = tmp_path / f"data{suffix}"
    frame = pd.DataFrame({"alpha": [1.0, 2.0], "beta": [3.0, 4.0]})
    frame.to_csv(path, index=False) if suffix == ".csv" else frame.to_parquet(path)
    with pytest.raises(InputError, match=r"column 'gamma' not found in .*; columns: alpha, beta"):
        load_sample(path, "gamma")
    with pytest.raises(InputError, match=r"column 'w' not found"):
        load_sample(path, "alpha", weights="w")


def test_non_numeric_column_names_an_example(tmp_path):
    path = tmp_path / "data.csv"
    pd.DataFrame({"x": ["1.5", "2", "oops", "4", "n/a?"]}).to_csv(path, index=False)
    with pytest.raises(
        InputError, match=r"column 'x' in .* is not numeric \(2 non-numeric value\(s\), e\.g\. 'oops'\)"
    ):
        load_sample(path, "x")


def test_numeric_strings_are_accepted(tmp_path):
    frame = pd.DataFrame({"x": ["1.5", "2", "4e-1"]})
    np.testing.assert_array_equal(numeric_column(frame, "x", "here"), [1.5, 2.0, 0.4])


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_nan_and_inf_are_counted(tmp_path, suffix):
    path = tmp_path / f"data{suffix}"
    frame = pd.DataFrame({"x": [1.0, np.nan, 2.0, np.inf, np.nan, -np.inf, 3.0]})
    frame.to_csv(path, index=False) if suffix == ".csv" else frame.to_parquet(path)
    with pytest.raises(InputError, match=r"2 missing/NaN and 2 infinite value\(s\) out of 7 \(first at row 1\)"):
        load_sample(path, "x")


def test_empty_column_is_an_input_error(tmp_path):
    path = tmp_path / "empty.csv"
    path.write_text("x,y\n")
    with pytest.raises(InputError, match=r"column 'x' in .* is empty"):
        load_sample(path, "x")


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match=r"data file not found: .*nothing\.csv"):
        load_sample(tmp_path / "nothing.csv", "x")


def test_bad_extension_lists_the_valid_ones(tmp_path):
    path = tmp_path / "data.xlsx"
    path.write_text("x\n1\n")
    with pytest.raises(InputError, match=r"unsupported data file extension '\.xlsx' .*valid: \.csv, \.parquet, \.pq"):
        load_sample(path, "x")


def test_malformed_parquet_is_an_input_error(tmp_path):
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"this is not a parquet file at all")
    with pytest.raises(InputError, match=r"cannot read .*broken\.parquet as Parquet: \S"):
        load_sample(path, "x")


@pytest.mark.parametrize("weights, pattern", [([1.0, -1.0, 2.0], "negative values"), ([0.0, 0.0, 0.0], "sums to 0")])
def test_bad_weights(tmp_path, weights, pattern):
    path = tmp_path / "data.csv"
    pd.DataFrame({"x": [1.0, 2.0, 3.0], "w": weights}).to_csv(path, index=False)
    with pytest.raises(InputError, match=pattern):
        load_sample(path, "x", weights="w")


# --- support checks ------------------------------------------------------------------------------


def test_values_outside_the_support_are_counted_with_an_example():
    sample = Sample(np.array([1.0, 2.0, -3.0, 0.5, -4.0]), "test")
    with pytest.raises(InputError, match=r"2 of 5 values in test are outside the support of gamma .*e\.g\. -3"):
        check_support(get_family("gamma"), sample)
    with pytest.raises(InputError, match=r"1 of 3 values .* poisson .*e\.g\. 1\.5"):
        check_support(get_family("poisson"), Sample(np.array([1.0, 1.5, 2.0]), "test"))
    with pytest.raises(InputError, match=r"2 of 3 values .* beta .*e\.g\. 0"):
        check_support(get_family("beta"), Sample(np.array([0.0, 0.5, 1.0]), "test"))


def test_constant_and_empty_data_are_refused():
    with pytest.raises(InputError, match=r"all 3 value\(s\) in test equal 2\.5: a family cannot be fitted to constant"):
        check_support(get_family("normal"), Sample(np.array([2.5, 2.5, 2.5]), "test"))
    with pytest.raises(InputError, match="all 1 value"):
        check_support(get_family("normal"), Sample(np.array([2.5]), "test"))
    with pytest.raises(InputError, match="no data in test"):
        check_support(get_family("normal"), Sample(np.array([]), "test"))


@pytest.mark.parametrize("name", sorted(CASES))
def test_samples_from_each_family_pass_its_support_check(name):
    check_support(get_family(name), Sample(CASES[name].sample(200, seed=1), name))


# --- simulation ----------------------------------------------------------------------------------


def test_simulation_is_reproducible_per_seed_and_keeps_the_truth():
    family = get_family("gamma")
    first = simulate_sample(family, {"concentration": 2.5, "rate": 1.7}, 2000, seed=3)
    again = simulate_sample(family, {"concentration": 2.5, "rate": 1.7}, 2000, seed=3)
    other = simulate_sample(family, {"concentration": 2.5, "rate": 1.7}, 2000, seed=4)
    np.testing.assert_array_equal(first.values, again.values)
    assert not np.array_equal(first.values, other.values)
    assert first.truth == {"concentration": 2.5, "rate": 1.7}
    assert first.values.dtype == np.float64 and first.n == 2000
    assert first.source == "simulated gamma(concentration=2.5, rate=1.7), n=2000, seed=3"
    # the draws follow the distribution they claim
    assert stats.kstest(first.values, stats.gamma(2.5, scale=1 / 1.7).cdf).pvalue > 1e-3


def test_simulation_does_not_touch_the_global_torch_generator():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    simulate_sample(get_family("normal"), {"loc": 0.0, "scale": 1.0}, 10, seed=0)
    assert torch.equal(torch.rand(3), expected)


def test_simulation_labels_vector_parameters():
    sample = simulate_sample(get_family("categorical"), {"logits": [0.5, -0.3, 1.0]}, 3000, seed=5)
    assert sample.truth == {"logits_1": 0.5, "logits_2": -0.3, "logits_3": 1.0}
    expected = CASES["categorical"].frozen().pmf(np.arange(4))
    counts = np.bincount(sample.values.astype(int), minlength=4)
    assert stats.chisquare(counts, 3000 * expected).pvalue > 1e-3


@pytest.mark.parametrize(
    "params, pattern",
    [
        ({"loc": 0.0}, "needs exactly the parameters loc, scale; got loc"),
        ({"loc": 0.0, "scale": 1.0, "df": 3.0}, "needs exactly the parameters"),
        ({"loc": 0.0, "scale": -1.0}, "invalid parameters for simulating normal"),
    ],
)
def test_simulation_refuses_bad_parameters(params, pattern):
    with pytest.raises(InputError, match=pattern):
        simulate_sample(get_family("normal"), params, 10, seed=0)


def test_simulated_triangular_recovers_its_truth():
    sample = simulate_sample(get_family("triangular"), {"lower": 1.0, "peak": 3.5, "upper": 5.0}, 2000, seed=6)
    assert stats.kstest(sample.values, CASES["triangular"].frozen().cdf).pvalue > 1e-3
    result = fit_mle(get_family("triangular"), sample.observations())
    for label, tol in (("lower", 0.05), ("peak", 0.25), ("upper", 0.05)):
        assert abs(result.params[label] - sample.truth[label]) < tol


# --- splits and fingerprints ---------------------------------------------------------------------


@given(n=st.integers(2, 300), fraction=st.floats(0.0, 0.9), seed=st.integers(0, 2**32 - 1))
def test_split_partitions_the_sample(n, fraction, seed):
    values = np.arange(n, dtype=np.float64) * 1.5
    weights = np.arange(n, dtype=np.float64) + 1
    sample = Sample(values, "src", weights, {"loc": 1.0})
    train, heldout = sample.split(fraction, seed)
    assert heldout.n == int(round(fraction * n)) and train.n + heldout.n == n
    np.testing.assert_array_equal(np.sort(np.concatenate([train.values, heldout.values])), values)
    # weights travel with their values; the truth is kept
    np.testing.assert_array_equal(train.weights, train.values / 1.5 + 1)
    np.testing.assert_array_equal(heldout.weights, heldout.values / 1.5 + 1)
    assert train.truth == heldout.truth == {"loc": 1.0}
    assert (train.source, heldout.source) == ("src (train)", "src (heldout)")
    again = sample.split(fraction, seed)
    np.testing.assert_array_equal(again[1].values, heldout.values)


def test_split_depends_on_its_seed():
    sample = Sample(np.arange(100, dtype=np.float64), "src")
    assert not np.array_equal(sample.split(0.2, 0)[1].values, sample.split(0.2, 1)[1].values)


def test_fingerprint_follows_the_data():
    values = np.array([1.0, 2.0, 3.0])
    base = Sample(values, "a").fingerprint
    assert base == Sample(values.copy(), "b").fingerprint  # the source does not matter
    assert base != Sample(np.array([1.0, 2.0, 3.0000001]), "a").fingerprint
    assert base != Sample(values[::-1].copy(), "a").fingerprint
    assert base != Sample(values, "a", np.array([1.0, 1.0, 2.0])).fingerprint
    assert len(base) == 16 and int(base, 16) >= 0


def test_summary_and_observations():
    sample = Sample(np.array([1.0, 2.0, 6.0]), "s", np.array([1.0, 2.0, 1.0]))
    assert sample.summary() == pytest.approx(
        {"n": 3, "mean": 3.0, "std": np.std([1.0, 2.0, 6.0]), "min": 1.0, "max": 6.0}
    )
    observations = sample.observations(torch.float32)
    assert observations.values.dtype == torch.float32 and observations.weights.dtype == torch.float32
    assert observations.total_weight == 4.0


# --- real data -----------------------------------------------------------------------------------


def test_groundbeef_loads_and_fits_as_published(shared_data):
    """fitdistrplus's groundbeef serving sizes: n = 254, and its documented gamma fit
    (shape 4.008, rate 0.05442), lognormal (4.169, 0.5366) and Weibull (shape 2.186, scale 83.35)."""
    sample = load_sample(shared_data / "groundbeef.csv", "serving")
    assert sample.n == 254 and sample.values.min() == 10.0 and sample.values.max() == 200.0
    assert sample.values.mean() == pytest.approx(73.6457, abs=1e-4)
    for name in ("gamma", "lognormal", "weibull"):
        check_support(get_family(name), sample)
    observations = sample.observations()
    gamma = fit_mle(get_family("gamma"), observations).params
    assert gamma["concentration"] == pytest.approx(4.008, abs=1e-3) and gamma["rate"] == pytest.approx(
        0.05443, abs=1e-5
    )
    lognormal = fit_mle(get_family("lognormal"), observations).params
    assert lognormal["loc"] == pytest.approx(4.1694, abs=1e-4) and lognormal["scale"] == pytest.approx(0.5366, abs=1e-4)
    weibull = fit_mle(get_family("weibull"), observations).params
    assert weibull["concentration"] == pytest.approx(2.1856, abs=1e-4) and weibull["scale"] == pytest.approx(
        83.347, abs=1e-3
    )
    # and the gamma NLL is no worse than scipy's own fit
    a, _, scale = stats.gamma.fit(sample.values, floc=0)
    ours = -stats.gamma(gamma["concentration"], scale=1 / gamma["rate"]).logpdf(sample.values).sum()
    assert ours <= -stats.gamma(a, scale=scale).logpdf(sample.values).sum() + 1e-9 * abs(ours)
    assert not math.isnan(ours)
