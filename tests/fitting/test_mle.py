"""The autograd MLE loop: the seed's gradients and SGD step, fixed and initial values, input errors,
optimisers against analytic MLEs, trace gradients against finite differences, divergence, float32,
data-bounded families and devices."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from family_table import CASES
from hypothesis import given
from hypothesis import strategies as st
from scipy import stats
from scipy.special import softmax

from nllflow.errors import InputError
from nllflow.evaluation.summary import evaluate_fit
from nllflow.families import get_family
from nllflow.fitting.engine import Tolerances
from nllflow.fitting.mle import FitSettings, fit_mle, resolve_device, resolve_dtype
from nllflow.likelihood.observations import Observations
from nllflow.models.constant import ConstantModel

NORMAL = get_family("normal")


def _obs(x, dtype=torch.float64, weights=None) -> Observations:
    w = None if weights is None else torch.as_tensor(weights, dtype=dtype)
    return Observations(torch.as_tensor(x, dtype=dtype), w)


@pytest.fixture(scope="module")
def normal_data() -> np.ndarray:
    return np.random.default_rng(0).normal(1.5, 2.0, 500)


# --- the seed's examples -------------------------------------------------------------------------


def test_seed_normal_gradients_and_one_sgd_step():
    """NLL = log σ + (x-μ)²/(2σ²) + const at x = 2, μ = 0, σ = 1: ∂/∂μ = -(x-μ)/σ² = -2,
    ∂/∂σ = 1/σ - (x-μ)²/σ³ = -3; one step of lr 0.1 gives μ = 0.2, σ = 1.3."""
    result = fit_mle(
        NORMAL, _obs([2.0]), init={"loc": 0.0, "scale": 1.0}, settings=FitSettings("sgd", 0.1, max_steps=1)
    )
    first, second = result.trace.iloc[0], result.trace.iloc[1]
    assert (first["loc"], first["scale"]) == (0.0, 1.0)
    assert first["grad_loc"] == pytest.approx(-2.0, abs=1e-14)
    assert first["grad_scale"] == pytest.approx(-3.0, abs=1e-14)
    assert first["nll"] == pytest.approx(0.5 * math.log(2 * math.pi) + 2.0, abs=1e-14)
    assert second["loc"] == pytest.approx(0.2, abs=1e-14)
    assert second["scale"] == pytest.approx(1.3, abs=1e-14)
    assert (result.steps, result.converged, result.reason) == (1, False, "max steps reached")
    assert result.params == pytest.approx({"loc": 0.2, "scale": 1.3}, abs=1e-14)
    assert list(result.trace["step"]) == [0, 1] and set(result.trace["lr"]) == {0.1}


def test_seed_normal_gradients_are_means_over_the_data():
    x = np.array([2.0, -1.0, 0.5, 3.0])
    result = fit_mle(NORMAL, _obs(x), init={"loc": 0.0, "scale": 1.0}, settings=FitSettings("sgd", 0.1, max_steps=1))
    row = result.trace.iloc[0]
    assert row["grad_loc"] == pytest.approx(-x.mean(), abs=1e-14)
    assert row["grad_scale"] == pytest.approx(1 - (x**2).mean(), abs=1e-14)


def test_seed_categorical_gradient_is_softmax_minus_onehot():
    """The seed's logits [0.1, 0.5, 1.2] and observed category 2, through torch's Categorical."""
    logits = torch.tensor([0.1, 0.5, 1.2], dtype=torch.float64, requires_grad=True)
    nll = -torch.distributions.Categorical(logits=logits).log_prob(torch.tensor(2))
    nll.backward()
    expected = softmax([0.1, 0.5, 1.2]) - np.eye(3)[2]
    np.testing.assert_allclose(logits.grad.numpy(), expected, atol=1e-15)
    # our family pins logit 0: the same distribution has free logits [0.4, 1.1]
    free = torch.tensor([0.4, 1.1], dtype=torch.float64, requires_grad=True)
    nll = -get_family("categorical").build(logits=free).log_prob(torch.tensor(2.0, dtype=torch.float64))
    nll.backward()
    np.testing.assert_allclose(free.grad.numpy(), expected[1:], atol=1e-15)


def test_categorical_trace_gradient_is_softmax_minus_frequencies():
    """For the mean NLL of a sample the gradient is softmax − empirical frequencies."""
    x = np.array([0, 1, 1, 2, 2, 2, 3, 0, 2, 1], dtype=np.float64)
    init = [0.4, 1.1, -0.3]
    result = fit_mle(get_family("categorical"), _obs(x), init={"logits": init}, settings=FitSettings("sgd", 0.1, 1))
    row = result.trace.iloc[0]
    expected = softmax([0.0, *init]) - np.bincount(x.astype(int)) / len(x)
    got = [row[f"grad_logits_{i}"] for i in (1, 2, 3)]
    np.testing.assert_allclose(got, expected[1:], atol=1e-14)
    # the MLE: log-odds of the observed frequencies against category 0
    fitted = fit_mle(get_family("categorical"), _obs(x))
    freq = np.bincount(x.astype(int)) / len(x)
    np.testing.assert_allclose([fitted.params[f"logits_{i}"] for i in (1, 2, 3)], np.log(freq[1:] / freq[0]), atol=1e-6)


# --- fixed and initial values --------------------------------------------------------------------


def test_fixed_parameters_stay_fixed_and_leave_k(normal_data):
    observations = _obs(normal_data)
    result = fit_mle(NORMAL, observations, fixed={"loc": 1.0})
    assert result.params["loc"] == 1.0 and result.fixed == {"loc": 1.0}
    assert result.free == ("scale",) and "loc" not in result.trace and "grad_loc" not in result.trace
    # with μ known, the MLE of σ is the root mean square deviation from it
    # (to the accuracy gtol allows: |∂ mean NLL/∂ log σ| ≈ 2 |Δσ|/σ ≤ 1e-8)
    assert result.params["scale"] == pytest.approx(np.sqrt(np.mean((normal_data - 1.0) ** 2)), rel=1e-7)
    evaluation = evaluate_fit(NORMAL, observations, result)
    assert evaluation.k == 1
    assert evaluation.aic == pytest.approx(2 * 1 + 2 * result.nll, rel=1e-14)


def test_all_parameters_fixed_is_one_evaluation(normal_data):
    result = fit_mle(NORMAL, _obs(normal_data), fixed={"loc": 1.0, "scale": 2.0})
    assert result.free == () and result.steps == 0 and result.converged
    assert result.nll == pytest.approx(-stats.norm(1.0, 2.0).logpdf(normal_data).sum(), rel=1e-12)


@pytest.mark.parametrize("optimizer", ["lbfgs", "adam", "sgd"])
def test_init_values_start_the_trace(optimizer, normal_data):
    result = fit_mle(
        NORMAL, _obs(normal_data), init={"loc": -3.0, "scale": 0.5}, settings=FitSettings(optimizer, None, 3)
    )
    first = result.trace.iloc[0]
    assert (first["loc"], first["scale"]) == pytest.approx((-3.0, 0.5), abs=1e-14)
    assert first["nll"] == pytest.approx(-stats.norm(-3.0, 0.5).logpdf(normal_data).sum(), rel=1e-12)


@pytest.mark.parametrize(
    "family, kind, values, pattern",
    [
        ("normal", "fixed", {"mu": 1.0}, r"unknown parameter 'mu'.*valid: loc, scale"),
        ("normal", "init", {"sigma": 1.0}, r"unknown parameter 'sigma'"),
        ("normal", "fixed", {"scale": -1.0}, r"scale=-1 is outside the parameter space of normal"),
        ("normal", "init", {"scale": 0.0}, r"initial value scale=0 is outside"),
        ("normal", "fixed", {"loc": math.nan}, r"fixed value of loc must be finite"),
        ("normal", "init", {"scale": math.inf}, r"initial value of scale must be finite"),
        ("normal", "init", {"loc": "abc"}, r"initial value of loc must be a number"),
        ("normal", "init", {"loc": [1.0, 2.0]}, r"initial value of loc .* 1 component"),
        ("categorical", "init", {"logits": [0.1, 0.2]}, r"initial value of logits for categorical must have 3"),
        ("categorical", "fixed", {"logits": [0.1, 0.2, 0.3, 0.4]}, r"fixed value of logits .* 3 component"),
        ("pareto", "fixed", {"scale": 10.0}, r"fixed value scale=10 is outside"),
        ("uniform", "init", {"low": 1.5}, r"initial value low=1.5 is outside"),
        ("triangular", "init", {"lower": 0.0, "peak": 9.0, "upper": 5.0}, r"initial value peak=9 is outside"),
        ("binomial", "fixed", {"total_count": 2.5}, r"total_count=2.5 is outside"),
        ("binomial", "fixed", {}, r"binomial needs a fixed total_count"),
    ],
)
def test_invalid_fixed_or_initial_values_name_the_parameter(family, kind, values, pattern):
    x = {"categorical": [0.0, 1.0, 2.0, 3.0, 3.0]}.get(family, [1.0, 2.0, 3.0, 4.0])
    fixed = values if kind == "fixed" else ({"total_count": 5} if family == "binomial" else None)
    init = values if kind == "init" else None
    with pytest.raises(InputError, match=pattern):
        fit_mle(get_family(family), _obs(x), fixed=fixed, init=init)


def test_a_one_element_list_is_a_scalar_value(normal_data):
    result = fit_mle(
        NORMAL, _obs(normal_data), init={"loc": [2.0]}, fixed={"scale": [1.5]}, settings=FitSettings("sgd", 0.1, 1)
    )
    assert result.trace["loc"].iloc[0] == 2.0 and result.params["scale"] == 1.5
    assert result.trace["grad_loc"].iloc[0] == pytest.approx((2.0 - normal_data.mean()) / 1.5**2, rel=1e-12)


def test_triangular_with_its_peak_fixed_below_the_data():
    """All data on the falling edge: the likelihood pushes lower up to the fixed peak, and upper
    maximises Σ log(b − x) − 2n log(b − c) (scipy's triang with c = 0 at the peak, fitted for its scale)."""
    x = np.random.default_rng(0).triangular(0.0, 0.5, 5.0, 200) + 1.0
    result = fit_mle(get_family("triangular"), _obs(x), fixed={"peak": 0.5})
    assert result.free == ("lower", "upper") and result.params["peak"] == 0.5
    assert result.params["lower"] == pytest.approx(0.5, abs=1e-6) and result.params["lower"] < 0.5
    _, loc, scale = stats.triang.fit(x, fc=0.0, floc=0.5)
    assert result.params["upper"] == pytest.approx(loc + scale, rel=1e-4)
    theirs = -stats.triang(0.0, loc, scale).logpdf(x).sum()
    assert result.nll <= theirs + 1e-9 * abs(theirs)


@pytest.mark.parametrize(
    "settings, pattern",
    [
        (dict(optimizer="sgd", lr=0.0), "learning rate must be a positive number, got 0.0"),
        (dict(optimizer="adam", lr=-0.1), "learning rate must be a positive number, got -0.1"),
        (dict(optimizer="adam", lr=math.nan), "learning rate must be a positive number"),
        (dict(optimizer="bfgs"), r"unknown optimizer 'bfgs'; valid: lbfgs, adam, sgd, newton"),
        (dict(optimizer="newton", lr=0.5), "newton takes full Newton steps.*give no learning rate"),
        (dict(optimizer="sgd", max_steps=0), "max steps must be at least 1"),
    ],
)
def test_invalid_settings_raise_input_error(settings, pattern):
    with pytest.raises(InputError, match=pattern):
        FitSettings(**settings)


def test_default_learning_rates():
    assert [FitSettings(o).learning_rate for o in ("lbfgs", "adam", "sgd", "newton")] == [1.0, 0.05, 0.1, 1.0]
    assert FitSettings("adam", 0.3).learning_rate == 0.3


# --- optimisers ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "settings, tol",
    # gtol 1e-8 on ∂ mean NLL/∂μ = (μ − x̄)/σ² allows |μ − x̄| up to 4e-8 here
    [(FitSettings("lbfgs"), 1e-6), (FitSettings("adam", 0.05, 3000), 1e-4), (FitSettings("sgd", 0.1, 3000), 1e-4)],
)
def test_every_optimizer_recovers_the_normal_mle(settings, tol, normal_data):
    result = fit_mle(NORMAL, _obs(normal_data), init={"loc": 0.0, "scale": 1.0}, settings=settings)
    assert result.converged, result.reason
    assert result.steps > 1
    assert result.params["loc"] == pytest.approx(normal_data.mean(), abs=tol)
    assert result.params["scale"] == pytest.approx(normal_data.std(), abs=tol)
    # the NLL decreases overall and the final row is the reported result
    assert result.trace["nll"].iloc[-1] < result.trace["nll"].iloc[0]
    assert result.nll == result.trace["nll"].iloc[-1] == pytest.approx(result.mean_nll * len(normal_data), rel=1e-14)


@pytest.mark.parametrize("optimizer", ["adam", "sgd", "lbfgs"])
def test_trace_gradients_equal_finite_differences(optimizer):
    """The trace's ∂(mean NLL)/∂θ at sampled rows against central differences of the mean NLL,
    computed with scipy's gamma log-density."""
    x = np.random.default_rng(1).gamma(2.5, 1 / 1.7, 300)
    init = {"concentration": 1.0, "rate": 1.0}
    result = fit_mle(get_family("gamma"), _obs(x), init=init, settings=FitSettings(optimizer, None, 40))
    trace = result.trace

    def mean_nll(k: float, rate: float) -> float:
        return float(-stats.gamma(k, scale=1 / rate).logpdf(x).mean())

    rows = sorted({0, 1, len(trace) // 2, len(trace) - 1})
    assert len(rows) >= 3
    for i in rows:
        k, rate = trace["concentration"].iloc[i], trace["rate"].iloc[i]
        h = 1e-6
        fd_k = (mean_nll(k + h * k, rate) - mean_nll(k - h * k, rate)) / (2 * h * k)
        fd_rate = (mean_nll(k, rate + h * rate) - mean_nll(k, rate - h * rate)) / (2 * h * rate)
        assert trace["grad_concentration"].iloc[i] == pytest.approx(fd_k, rel=1e-6, abs=1e-8)
        assert trace["grad_rate"].iloc[i] == pytest.approx(fd_rate, rel=1e-6, abs=1e-8)
        assert trace["mean_nll"].iloc[i] == pytest.approx(mean_nll(k, rate), rel=1e-12)
        assert trace["grad_norm"].iloc[i] == pytest.approx(math.hypot(fd_k, fd_rate), rel=1e-6, abs=1e-8)


def test_weights_act_as_repeated_observations():
    rng = np.random.default_rng(2)
    x = rng.gamma(2.0, 1.0, 100)
    w = rng.integers(1, 5, 100).astype(np.float64)
    weighted = fit_mle(get_family("gamma"), _obs(x, weights=w))
    repeated = fit_mle(get_family("gamma"), _obs(np.repeat(x, w.astype(int))))
    assert weighted.nll == pytest.approx(repeated.nll, rel=1e-10)
    for label in ("concentration", "rate"):
        assert weighted.params[label] == pytest.approx(repeated.params[label], rel=1e-6)


def test_progress_reports_every_trace_row(normal_data):
    seen = []
    result = fit_mle(
        NORMAL,
        _obs(normal_data),
        init={"loc": 0.0, "scale": 1.0},
        settings=FitSettings("adam", 0.1, 20),
        progress=lambda step, nll: seen.append((step, nll)),
    )
    assert [s for s, _ in seen] == list(result.trace["step"])
    np.testing.assert_allclose([v for _, v in seen], result.trace["mean_nll"], rtol=1e-15)


# --- divergence ----------------------------------------------------------------------------------


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "lbfgs"])
def test_a_huge_learning_rate_diverges_and_keeps_finite_rows(optimizer, normal_data):
    # σ = 3 is above the sample's spread, so ∂NLL/∂σ > 0 and SGD's first step takes σ below 0
    init = {"loc": 0.0, "scale": 3.0}
    result = fit_mle(NORMAL, _obs(normal_data), init=init, settings=FitSettings(optimizer, 1e6, 50))
    assert result.reason.startswith("diverged") and result.diverged and not result.converged
    assert len(result.trace) >= 1 and np.isfinite(result.trace.to_numpy(dtype=float)).all()
    assert (result.trace["loc"].iloc[0], result.trace["scale"].iloc[0]) == pytest.approx((0.0, 3.0), abs=1e-14)
    # the reported estimate is the last finite row
    last = result.trace.iloc[-1]
    assert (result.params["loc"], result.params["scale"]) == (last["loc"], last["scale"])
    assert result.nll == last["nll"] and math.isfinite(result.nll)


def test_sgd_stuck_on_a_data_bound_is_not_divergence():
    """Pareto's scale approaches the sample minimum; an SGD step past it stops the run there (the
    polish then holds the scale on the minimum) instead of failing as diverged."""
    x = CASES["pareto"].sample(300, seed=1)
    result = fit_mle(get_family("pareto"), _obs(x), settings=FitSettings("sgd", None, 300))
    assert not result.diverged, result.reason
    assert result.params["scale"] == x.min()
    assert result.params["alpha"] == pytest.approx(len(x) / np.log(x / x.min()).sum(), rel=1e-4)


# --- float32 -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["normal", "gamma", "weibull", "poisson"])
def test_float32_fits_agree_with_float64(name):
    case = CASES[name]
    x = case.sample(1000, seed=3)
    r32 = fit_mle(get_family(name), _obs(x, torch.float32))
    r64 = fit_mle(get_family(name), _obs(x, torch.float64))
    assert r32.converged and r64.converged
    assert r32.natural[next(iter(r32.natural))].dtype == torch.float32
    assert r32.params == pytest.approx(r64.params, rel=2e-3)
    assert r32.nll == pytest.approx(r64.nll, rel=1e-5)


def test_tolerances_depend_on_dtype_and_optimizer():
    assert Tolerances.for_settings(torch.float64, "lbfgs", None, None) == Tolerances(1e-8, 1e-12)
    assert Tolerances.for_settings(torch.float32, "lbfgs", None, None) == Tolerances(1e-4, 1e-7)
    assert Tolerances.for_settings(torch.float32, "lbfgs", 1e-3, None) == Tolerances(1e-3, 1e-7)
    # no relative-change test for Adam and SGD unless asked for
    assert Tolerances.for_settings(torch.float64, "adam", None, None) == Tolerances(1e-8, 0.0)
    assert Tolerances.for_settings(torch.float64, "sgd", None, 1e-9) == Tolerances(1e-8, 1e-9)


# --- data-bounded families -----------------------------------------------------------------------


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "lbfgs"])
@pytest.mark.parametrize("name", ["uniform", "pareto", "triangular"])
def test_data_bounded_families_keep_every_point_inside(name, optimizer):
    """Every trace row's NLL is finite and equals scipy's at that row's parameters: the support
    never loses a data point on the way."""
    case = CASES[name]
    x = case.sample(300, seed=4)
    result = fit_mle(get_family(name), _obs(x), settings=FitSettings(optimizer, None, 150))
    assert not result.diverged, result.reason
    trace = result.trace
    assert np.isfinite(trace["nll"]).all()
    rows = np.unique(np.linspace(0, len(trace) - 1, 15).astype(int))
    for i in rows:
        params = {label: trace[label].iloc[i] for label in result.free}
        assert trace["nll"].iloc[i] == pytest.approx(-case.scipy(params).logpdf(x).sum(), rel=1e-10)
    # and the fit is the MLE of the bounds where it is known in closed form
    if name == "uniform":
        assert result.params["low"] == x.min() and result.params["high"] == np.nextafter(x.max(), np.inf)
    if name == "pareto":
        assert result.params["scale"] == x.min()


@given(st.lists(st.floats(-1e3, 1e3), min_size=3, max_size=30, unique=True), st.floats(0.0, 1.0))
def test_unconstrained_round_trip_for_triangular(values, at):
    """natural(unconstrained(θ)) = θ for a feasible θ under the data-dependent, chained constraints."""
    x = torch.tensor(values, dtype=torch.float64)
    lo, hi = float(x.min()), float(x.max())
    span = hi - lo
    theta = {
        "lower": torch.tensor(lo - 0.3 * span - 1e-3, dtype=torch.float64),
        "upper": torch.tensor(hi + 0.2 * span + 1e-3, dtype=torch.float64),
    }
    theta["peak"] = theta["lower"] + at * (theta["upper"] - theta["lower"])
    theta["peak"] = theta["peak"].clamp(theta["lower"] + 1e-6 * span, theta["upper"] - 1e-6 * span)
    space = ConstantModel(get_family("triangular"), Observations(x))
    assert space.first_infeasible(theta) is None
    back = space.natural(space.unconstrained(theta))
    for name in theta:
        assert float(back[name]) == pytest.approx(float(theta[name]), rel=1e-9, abs=1e-9 * (1 + span))


# --- devices and dtypes --------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_cuda_is_an_input_error():
    with pytest.raises(InputError, match="'cuda' requested but CUDA is not available"):
        resolve_device("cuda")
    with pytest.raises(InputError, match="cuda:1"):
        resolve_device("cuda:1")
    assert resolve_device("auto") == torch.device("cpu")


def test_devices_and_dtypes():
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(InputError, match="unknown device 'tpu'; valid: auto, cpu, cuda"):
        resolve_device("tpu")
    assert resolve_dtype("float32") == torch.float32 and resolve_dtype("float64") == torch.float64
    with pytest.raises(InputError, match="unknown dtype 'float16'; valid: float64, float32"):
        resolve_dtype("float16")


def test_start_values_outside_the_data_range_are_an_input_error():
    """A binomial whose data exceed the fixed total_count has no finite NLL anywhere."""
    with pytest.raises(InputError, match=r"fixed value total_count=5 is outside .* IntegerInterval\(lower_bound=9"):
        fit_mle(get_family("binomial"), _obs([1.0, 2.0, 9.0]), fixed={"total_count": 5})
