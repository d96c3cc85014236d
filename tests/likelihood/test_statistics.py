"""The fast likelihoods (nllflow.likelihood.statistics) against torch's own log_prob summed over the data:
values, gradients and Hessians, with weights, batched parameters and batched weights, across
chunk boundaries, far from zero, beside censored rows; and their statistics computed once per fit."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from family_table import CASES
from scipy import stats

from nllflow.families import family_names, get_family
from nllflow.fitting.mle import fit_mle
from nllflow.likelihood import statistics as fast_likelihood
from nllflow.likelihood.censoring import CensoredRows
from nllflow.likelihood.observations import Observations

FAST = [name for name in family_names() if get_family(name).likelihood is not None]
# off the true values, so that the gradients are far from zero
SHIFT = 1.1


def _generic(name: str, values: torch.Tensor, weights: torch.Tensor | None, params: dict) -> torch.Tensor:
    log_density = get_family(name).build(**params, validate_args=False).log_prob(values)
    return (log_density if weights is None else weights * log_density).sum(-1)


def _params(name: str, batch: tuple[int, ...] = ()) -> dict[str, torch.Tensor]:
    """The case's parameters moved off the truth, as leaves; with a batch, each row moved a little
    differently."""
    params = {}
    for key, value in CASES[name].params.items():
        value = float(value) * (SHIFT if key != "loc" else 1.0) + (0.1 if key == "loc" else 0.0)
        if name == "pareto" and key == "scale":
            value = 1.4  # below the smallest observation
        if name == "geometric":
            value = 0.3
        tensor = torch.full(batch + (1,) if batch else (), value, dtype=torch.float64)
        if batch:
            tensor = tensor * (1 + 0.01 * torch.arange(math.prod(batch), dtype=torch.float64).reshape(tensor.shape))
        params[key] = tensor.requires_grad_(True)
    return params


def _gradients(total: torch.Tensor, params: dict) -> list[torch.Tensor]:
    return list(torch.autograd.grad(total.sum(), list(params.values())))


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """Chunks of 1024 elements (fused passes and the moment pass): a few thousand points cross
    several chunk boundaries."""
    monkeypatch.setattr(fast_likelihood, "CPU_CHUNK", 1024)
    monkeypatch.setattr(fast_likelihood, "MOMENT_CHUNK", 1024)


@pytest.mark.parametrize("name", FAST)
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_total_and_gradient_equal_the_log_prob_sum(name, weighted):
    rng = np.random.default_rng(3)
    x = torch.as_tensor(CASES[name].sample(3001, seed=4))
    w = torch.as_tensor(rng.integers(0, 4, len(x)), dtype=torch.float64) if weighted else None
    params = _params(name)
    fast = Observations(x, w).log_likelihood(get_family(name), params)
    oracle = _generic(name, x, w, params)
    assert fast.shape == oracle.shape == ()
    assert float(fast.detach()) == pytest.approx(float(oracle.detach()), rel=1e-12)
    for got, want in zip(_gradients(fast, params), _gradients(oracle, params), strict=False):
        assert float(got) == pytest.approx(float(want), rel=1e-9, abs=1e-9 * len(x))


FUSED = [name for name in FAST if isinstance(get_family(name).likelihood, fast_likelihood.FusedPass)]


@pytest.mark.parametrize("name", FUSED)
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_a_fused_pass_over_two_threads_gives_the_same_totals_bit_for_bit(name, weighted, monkeypatch):
    """20 chunks: with two intra-op threads a helper thread walks half of them; the total and the
    gradient are those of one thread exactly, and the log_prob sum's."""
    started = []

    class Counted(fast_likelihood.threading.Thread):
        def start(self):
            started.append(self)
            super().start()

    monkeypatch.setattr(fast_likelihood.threading, "Thread", Counted)
    rng = np.random.default_rng(5)
    x = torch.as_tensor(CASES[name].sample(20_000, seed=6))
    w = torch.as_tensor(rng.integers(0, 4, len(x)), dtype=torch.float64) if weighted else None
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            params = _params(name)
            total = Observations(x, w).log_likelihood(get_family(name), params)
            results.append((float(total.detach()), [float(g) for g in _gradients(total, params)]))
    finally:
        torch.set_num_threads(before)
    assert len(started) == 1  # the two-thread evaluation had its helper
    assert results[0] == results[1]
    params = _params(name)
    oracle = _generic(name, x, w, params)
    assert results[1][0] == pytest.approx(float(oracle.detach()), rel=1e-12)
    for got, want in zip(results[1][1], _gradients(oracle, params), strict=True):
        assert got == pytest.approx(float(want), rel=1e-9, abs=1e-9 * len(x))


@pytest.mark.parametrize("name", FUSED)
@pytest.mark.parametrize("size", [3_000, 20_000], ids=["vectorised", "numpy"])
def test_fused_passes_running_at_once_keep_their_workspaces_apart(name, size):
    """Six passes on different data in six threads at once (a sweep's children in one process),
    short walks (torch's vectorised functions) and long ones (NumPy's, which two threads share):
    each total is the one it has alone, bit for bit, and its log_prob sum's; the pool keeps no more
    workspaces than KEPT_WORKSPACES afterwards."""
    family = get_family(name)
    data = [torch.as_tensor(CASES[name].sample(size + 7 * k, seed=10 + k)) for k in range(6)]
    alone = [float(Observations(x).log_likelihood(family, _params(name)).detach()) for x in data]
    together: list[float | None] = [None] * len(data)
    barrier = fast_likelihood.threading.Barrier(len(data))

    def evaluate(k: int) -> None:
        observations = Observations(data[k])
        barrier.wait()
        for _ in range(5):
            together[k] = float(observations.log_likelihood(family, _params(name)).detach())

    threads = [fast_likelihood.threading.Thread(target=evaluate, args=(k,)) for k in range(len(data))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert together == alone
    assert len(fast_likelihood._WORKSPACES) <= fast_likelihood.KEPT_WORKSPACES
    for x, total in zip(data, alone, strict=True):
        assert total == pytest.approx(float(_generic(name, x, None, _params(name)).detach()), rel=1e-12)


@pytest.mark.parametrize("name", FAST)
def test_batched_parameters_and_batched_weights(name):
    """A sweep's (K, 1) parameters, and a bootstrap's (B, n) weights with (B, 1) parameters: one
    total per row, each equal to its own log_prob sum."""
    x = torch.as_tensor(CASES[name].sample(2500, seed=5))
    params = _params(name, (4,))
    fast = Observations(x).log_likelihood(get_family(name), params)
    oracle = _generic(name, x, None, params)
    assert fast.shape == oracle.shape == (4,)
    np.testing.assert_allclose(fast.detach().numpy(), oracle.detach().numpy(), rtol=1e-12)
    for got, want in zip(_gradients(fast, params), _gradients(oracle, params), strict=False):
        assert got.shape == want.shape
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-9, atol=1e-9 * len(x))
    counts = torch.as_tensor(
        np.random.default_rng(6).multinomial(len(x), np.full(len(x), 1 / len(x)), size=3), dtype=torch.float64
    )
    params = _params(name, (3,))
    fast = Observations(x, counts).log_likelihood(get_family(name), params)
    oracle = _generic(name, x, counts, params)
    np.testing.assert_allclose(fast.detach().numpy(), oracle.detach().numpy(), rtol=1e-12)
    for got, want in zip(_gradients(fast, params), _gradients(oracle, params), strict=False):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-9, atol=1e-9 * len(x))


@pytest.mark.parametrize("name", FAST)
def test_hessian_equals_the_log_prob_hessian(name):
    """The observed information differentiates twice: the fused families' closed-form gradient
    must not turn into a zero second derivative."""
    x = torch.as_tensor(CASES[name].sample(2000, seed=7))
    params = _params(name)
    names = list(params)
    point = torch.stack([params[k].detach() for k in names])

    def total(observations):
        def f(flat):
            return observations.log_likelihood(get_family(name), dict(zip(names, flat.unbind(), strict=False)))

        return f

    fast = torch.autograd.functional.hessian(total(Observations(x)), point)
    oracle = torch.autograd.functional.hessian(
        lambda flat: _generic(name, x, None, dict(zip(names, flat.unbind(), strict=False))), point
    )
    np.testing.assert_allclose(fast.numpy(), oracle.numpy(), rtol=1e-9, atol=1e-9 * len(x))


def test_scipy_agrees_on_the_fused_families():
    """An oracle outside torch: scipy's log-densities summed."""
    for name, frozen in (
        ("studentt", lambda p: stats.t(p["df"], p["loc"], p["scale"])),
        ("weibull", lambda p: stats.weibull_min(p["concentration"], 0.0, p["scale"])),
    ):
        x = CASES[name].sample(5000, seed=8)
        params = {k: float(v.detach()) for k, v in _params(name).items()}
        fast = Observations(torch.as_tensor(x)).log_likelihood(
            get_family(name), {k: torch.tensor(v, dtype=torch.float64) for k, v in params.items()}
        )
        assert float(fast) == pytest.approx(frozen(params).logpdf(x).sum(), rel=1e-12)


@pytest.mark.parametrize("vectorised", [False, True], ids=["numpy", "torch"])
def test_grouped_logarithms_sum_like_one_by_one(vectorised):
    """VectorisedNumPy.log_sum (one logarithm per LOG_GROUP values) against math.fsum of each
    value's logarithm: three batch rows whose length leaves a tail after the groups, values near 1,
    weights, and values of 1e160, whose groups' products overflow (the logarithms one by one)."""
    rng = np.random.default_rng(8)
    u = 1 + rng.exponential(2.0, (3, 1003))
    u[:, :40] = 1 + rng.uniform(0, 1e-12, (3, 40))
    w = rng.integers(0, 4, u.shape[-1]).astype(np.float64)
    huge = u.copy()
    huge[1, ::3] = 1e160

    def exact(values: np.ndarray, weights: np.ndarray) -> list[float]:
        return [math.fsum(a * math.log(v) for a, v in zip(weights, row, strict=True)) for row in values]

    with fast_likelihood._workspace() as workspace:
        xp = fast_likelihood.VectorisedNumPy(workspace, vectorised)
        grouped, weighted, overflowed = xp.log_sum(u, None, 0), xp.log_sum(u, w, 0), xp.log_sum(huge, None, 0)
    assert grouped.shape == weighted.shape == overflowed.shape == (3, 1)
    ones = np.ones(u.shape[-1])
    # a few units in the last place of 1 per group, against sums of about 1e3
    np.testing.assert_allclose(grouped[:, 0], exact(u, ones), rtol=1e-14)
    np.testing.assert_allclose(weighted[:, 0], exact(u, w), rtol=1e-14)
    np.testing.assert_allclose(overflowed[:, 0], exact(huge, ones), rtol=1e-14)


@pytest.mark.parametrize("df", [3.0, 900.0, 1.1e3, 1e6, 1e15])
def test_studentt_pass_on_either_side_of_the_grouped_logarithms(df):
    """At df up to GROUPED_LOG_MAX_DF the Student-t pass sums grouped logarithms, above it log1p:
    both totals as scipy's log-densities summed exactly (at df = 1e15 the normal's, which differ
    by a part in 1e15), both gradients as torch's log_prob's."""
    from nllflow.families.continuous import GROUPED_LOG_MAX_DF

    assert 900.0 <= GROUPED_LOG_MAX_DF < 1.1e3
    x = 1.0 + 2.0 * np.random.default_rng(9).standard_t(df, 3001)
    params = {
        k: torch.tensor(v, dtype=torch.float64, requires_grad=True)
        for k, v in (("df", df), ("loc", 1.2), ("scale", 1.9))
    }
    fast = Observations(torch.as_tensor(x)).log_likelihood(get_family("studentt"), params)
    exact = math.fsum((stats.t(df, 1.2, 1.9) if df < 1e10 else stats.norm(1.2, 1.9)).logpdf(x))
    assert float(fast.detach()) == pytest.approx(exact, rel=1e-12)
    oracle = _generic("studentt", torch.as_tensor(x), None, params)
    # (at df = 1e15 the df-derivative, of order n/df², is rounding in both)
    compared = slice(None) if df < 1e10 else slice(1, None)
    for got, want in zip(_gradients(fast, params)[compared], _gradients(oracle, params)[compared], strict=True):
        assert float(got) == pytest.approx(float(want), rel=1e-8, abs=1e-9 * len(x))


def test_normal_statistics_keep_their_digits_far_from_zero():
    """Data at 1e8 with unit spread: raw power sums would lose every digit of Σ(x - μ)²; the centred
    moments keep them."""
    x = torch.as_tensor(1e8 + np.random.default_rng(9).normal(0.0, 1.0, 5000))
    params = {"loc": torch.tensor(1e8 + 0.05, dtype=torch.float64), "scale": torch.tensor(0.9, dtype=torch.float64)}
    fast = Observations(x).log_likelihood(get_family("normal"), params)
    exact = stats.norm(1e8 + 0.05, 0.9).logpdf(x.numpy()).sum()
    assert float(fast) == pytest.approx(exact, rel=1e-12)


def test_moments_are_exact_whichever_way_each_chunk_is_summed():
    """Chunks of 1024 that the pass sums raw (Σx, Σx²: a spread about zero), centres (constant
    data, data at 1e8 with unit spread: Σx² - (Σx)²/n would lose their digits) or mixes: the mean
    and Σ(x - mean)² equal the exact rational sums; constant data give m2 = 0 exactly."""
    rng = np.random.default_rng(12)
    pieces = [rng.normal(0, 1, 1024), np.full(1024, 5.25), 1e8 + rng.normal(0, 1, 1024), rng.normal(3, 2, 1000)]
    for values in [np.concatenate(pieces), pieces[1], pieces[2], np.concatenate([pieces[0], pieces[3]])]:
        moments = Observations(torch.as_tensor(values)).exact.moments("x")
        exact = [Fraction(v) for v in values.tolist()]
        mean = sum(exact) / len(exact)
        m2 = sum((v - mean) ** 2 for v in exact)
        assert float(moments.total) == len(values)
        assert float(moments.mean) == pytest.approx(float(mean), rel=1e-15, abs=1e-15)
        assert float(moments.m2) == pytest.approx(float(m2), rel=1e-12)
    assert float(Observations(torch.as_tensor(pieces[1])).exact.moments("x").m2) == 0.0


@pytest.mark.parametrize(
    "size", [1, 7, fast_likelihood.DOT_PIECE - 1, fast_likelihood.DOT_PIECE, 3 * fast_likelihood.DOT_PIECE + 5]
)
def test_squares_summed_in_pieces_and_a_rest_are_the_exact_sum(size):
    """A chunk's raw moments from Σx and Σx² as stacked dots of DOT_PIECE values plus a dot of
    the rest: every value counted once, whether the chunk is shorter than a piece, whole pieces or
    pieces and a rest (chunks of any size: this module's 1024 would stay below one piece)."""
    values = np.random.default_rng(size).normal(0.5, 2.0, size)
    exact = [Fraction(v) for v in values.tolist()]
    mean = sum(exact) / len(exact)
    raw = fast_likelihood._raw_moments(values)
    if size == 1:  # m2 = 0: left to the centred path, which gives it exactly
        assert raw is None
        return
    total, m2 = raw
    assert float(total[0]) == pytest.approx(float(sum(exact)), rel=1e-14)
    assert float(m2[0]) == pytest.approx(float(sum((v - mean) ** 2 for v in exact)), rel=1e-12)


def test_censored_rows_keep_their_own_path():
    """Exact rows by the fast rule, censored rows by their interval probabilities."""
    family = get_family("gamma")
    x = torch.as_tensor(CASES["gamma"].sample(3000, seed=10))
    low = torch.tensor([0.5, 1.0, -math.inf], dtype=torch.float64)
    high = torch.tensor([math.inf, 2.0, 0.3], dtype=torch.float64)
    params = {"concentration": torch.tensor(2.3, dtype=torch.float64), "rate": torch.tensor(1.5, dtype=torch.float64)}
    total = Observations(x, None, CensoredRows(low, high)).log_likelihood(family, params)
    frozen = stats.gamma(2.3, scale=1 / 1.5)
    censored = math.log(frozen.sf(0.5)) + math.log(frozen.cdf(2.0) - frozen.cdf(1.0)) + math.log(frozen.cdf(0.3))
    assert float(total) == pytest.approx(frozen.logpdf(x.numpy()).sum() + censored, rel=1e-12)


def test_statistics_are_computed_once_per_fit(monkeypatch):
    """A whole L-BFGS fit reads the data for log x exactly once (one call per chunk), from a start
    away from the MLE (the gamma's own start rule is the MLE: it converges at step 0)."""
    calls = []
    log = fast_likelihood.CPU_TRANSFORMS["log"]  # the CPU's walk (NumPy)
    monkeypatch.setitem(fast_likelihood.CPU_TRANSFORMS, "log", lambda x, out: calls.append(x.shape[-1]) or log(x, out))
    x = CASES["gamma"].sample(5000, seed=11)
    result = fit_mle(get_family("gamma"), Observations(torch.as_tensor(x)), init={"concentration": 1.0, "rate": 1.0})
    assert result.converged and result.steps >= 3
    assert sum(calls) == len(x)
    # and the estimate is scipy's
    a, _, scale = stats.gamma.fit(x, floc=0)
    assert result.params["concentration"] == pytest.approx(a, rel=1e-6)
    assert result.params["rate"] == pytest.approx(1 / scale, rel=1e-6)


def test_the_data_range_is_read_only_where_a_support_or_a_tie_needs_it():
    """A normal fit on data with a spread never takes the data's min and max (a pass over the data);
    a uniform's support reads them in the one statistics pass; tied data, where the scale's floor
    binds, still get the floor that the range sets."""
    x = torch.as_tensor(CASES["normal"].sample(5000, seed=3))
    spread = Observations(x)
    fit_mle(get_family("normal"), spread)
    assert "range" not in spread.exact.cache
    bounded = Observations(x)
    bounded.prepare(get_family("uniform"))
    assert bounded.exact.cache["range"] == (x.min(), x.max())
    tied = Observations(torch.full((100,), 1e6, dtype=torch.float64))
    assert float(get_family("normal").start(tied.exact)["scale"]) == pytest.approx(1e-12 * 1e6, rel=1e-12)
    assert "range" in tied.exact.cache
