"""The parameter models in `make bench` (benchmarks/run.py calls these; each returns rows of its table).

- Regression against statsmodels on the bundled RAND HIE rows (20 190, 9 covariates + intercept):
  NB2 (statsmodels' NegativeBinomial, Newton) and the Poisson GLM (IRLS) against nllflow's
  `fit_regression` with `newton` (IRLS's Newton step, through the linear predictors) and with
  L-BFGS (the default), fit times as medians of --repeats on the same data frame, the NLLs
  compared; goal: nllflow ≤ 1× statsmodels' time with an NLL never worse.
- Networks on one train/test split of bundled public data (Engel's food expenditure; scikit-learn's
  diabetes data): the test mean NLL of a normal network, of the normal linear model (loc and log
  scale linear in the same terms) and of NGBoost's `NGBRegressor` with its Normal distribution.
- Training throughput at 1e6 rows × 10 features (MLP 64×64, batch 4096, Adam, float32 on the CPU):
  nllflow's `fit_network` against a hand-written PyTorch loop of the same network, batch size and
  epochs; goal: the pipeline's overhead ≤ 10 %. Training throughput is rows × epochs over the time
  from the first to the last epoch's evaluation in nllflow's trace (the per-epoch validation,
  trace and early-stopping bookkeeping included); the fixed costs around it (the intercept-only
  start, the NLL at the start and at the end) are reported beside it.
"""

from __future__ import annotations

import itertools
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
RANDHIE_TERMS = "lncoins + idp + lpi + fmde + physlm + disea + hlthg + hlthf + hlthp"
THROUGHPUT_ROWS, THROUGHPUT_FEATURES, THROUGHPUT_BATCH, THROUGHPUT_EPOCHS = 1_000_000, 10, 4096, 5


def _median_time(function, repeats: int) -> tuple[float, Any]:
    times, value = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        value = function()
        times.append(time.perf_counter() - start)
    return float(np.median(times)), value


def regression_vs_statsmodels(repeats: int, quick: bool) -> list[dict[str, Any]]:
    import statsmodels.api as sm
    from statsmodels.discrete.discrete_model import NegativeBinomial

    from nllflow.data.samples import load_sample
    from nllflow.families import get_family
    from nllflow.fitting.mle import FitSettings
    from nllflow.fitting.regression import fit_regression
    from nllflow.models.linear import linear_model_for

    frame = pd.read_parquet(ROOT / "experiments" / "data" / "randhie.parquet")
    if quick:
        frame = frame.head(2000)
    path = Path(ROOT / "benchmarks" / "results")
    path.mkdir(parents=True, exist_ok=True)
    file = path / "randhie_rows.parquet"
    frame.to_parquet(file, index=False)
    covariates = RANDHIE_TERMS.split(" + ")
    sample = load_sample(str(file), "mdvis", None, covariates)
    rows = []
    cases = {
        "poisson GLM": (
            "poisson",
            {"rate": RANDHIE_TERMS},
            lambda: sm.GLM.from_formula(f"mdvis ~ {RANDHIE_TERMS}", frame, family=sm.families.Poisson()).fit(),
        ),
        "NB2": (
            "negativebinomial",
            {"mean": RANDHIE_TERMS},
            lambda: NegativeBinomial.from_formula(f"mdvis ~ {RANDHIE_TERMS}", frame, loglike_method="nb2").fit(
                method="newton", disp=0
            ),
        ),
    }
    print(f"{'model':20s} {'rows':>7s} {'coefs':>6s} {'statsmodels s':>14s} {'nllflow s':>10s} {'ratio':>7s} "
          f"{'NLL nllflow - statsmodels':>26s}")  # fmt: skip
    for (case, (family_name, formulas, peer)), optimizer in itertools.product(cases.items(), ("newton", "lbfgs")):
        family = get_family(family_name)
        name = f"{case} ({optimizer})"

        def ours(family=family, formulas=formulas, optimizer=optimizer):
            # everything a fit of a frame costs: the design, the device copy, the fit
            base = sample.observations()
            model = linear_model_for(family, formulas, {}, {}, {}, sample.covariates, base)
            observations = sample.observations(features=model.features(model.design_matrices()))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return fit_regression(model, observations, settings=FitSettings(optimizer))

        ours()  # warm-up: the first optimiser of a process imports torch._dynamo
        peer_s, peer_fit = _median_time(peer, repeats)
        ours_s, result = _median_time(ours, repeats)
        difference = result.nll - (-peer_fit.llf)
        ratio = ours_s / peer_s
        print(f"{name:20s} {len(frame):7d} {len(result.free):6d} {peer_s:14.3f} {ours_s:10.3f} {ratio:7.2f} "
              f"{difference:+26.3e}")  # fmt: skip
        rows.append(
            {
                "section": "regression",
                "name": name,
                "n": len(frame),
                "nllflow_s": ours_s,
                "scipy_s": peer_s,
                "ratio": ratio,
                "nll_diff": difference,
                "target": "≤ 1× statsmodels, NLL not worse",
                "met": bool(ratio <= 1.0 and difference <= 1e-9 * abs(peer_fit.llf)),
                "note": f"statsmodels {peer_s:.3f} s",
            }
        )
    return rows


def _diabetes() -> pd.DataFrame:
    from sklearn.datasets import load_diabetes

    bunch = load_diabetes(as_frame=True, scaled=False)
    return bunch.frame.rename(columns={"target": "progression"})


def _split(frame: pd.DataFrame, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    order = np.random.default_rng(seed).permutation(len(frame))
    cut = int(0.75 * len(frame))
    return frame.iloc[order[:cut]].reset_index(drop=True), frame.iloc[order[cut:]].reset_index(drop=True)


def networks_vs_linear_and_ngboost(quick: bool, folder: Path) -> list[dict[str, Any]]:
    from ngboost import NGBRegressor
    from ngboost.distns import Normal
    from scipy import stats

    from nllflow.pipeline.steps import run_core
    from nllflow.spec import parse_spec

    data_sets = {
        "engel": (pd.read_csv(ROOT / "experiments" / "data" / "engel.csv"), "foodexp", ["income"]),
        "diabetes": (_diabetes(), "progression", ["age", "sex", "bmi", "bp", "s1", "s2", "s3", "s4", "s5", "s6"]),
    }
    rows = []
    print(f"{'data':9s} {'train/test':>10s} {'network':>9s} {'linear':>9s} {'NGBoost':>9s}   (test mean NLL, normal)")
    for name, (frame, response, covariates) in data_sets.items():
        train, test = _split(frame)
        train.to_csv(folder / f"{name}_train.csv", index=False)
        test.to_csv(folder / f"{name}_test.csv", index=False)
        terms = " + ".join(covariates)
        base = {
            "name": f"bench-{name}",
            "family": "normal",
            "device": "cpu",
            "data": {"path": str(folder / f"{name}_train.csv"), "column": response,
                     "test_path": str(folder / f"{name}_test.csv")},
        }  # fmt: skip
        network = {
            "network": {"terms": terms, "hidden": [16, 16], "activation": "tanh", "dropout": 0.0},
            "training": {"batch_size": 32, "validation": 0.2, "patience": 40, "scheduler": "plateau",
                         "weight_decay": 1e-3},
            "optimizer": {"name": "adam", "lr": 0.003, "max_steps": 60 if quick else 600},
        }  # fmt: skip
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _, _, _, network_evaluation = run_core(parse_spec({**base, **network}))
            _, _, _, linear_evaluation = run_core(parse_spec({**base, "formulas": {"loc": terms, "scale": terms}}))
            boosted = NGBRegressor(Dist=Normal, n_estimators=100 if quick else 500, verbose=False, random_state=0)
            x_train, y_train = train[covariates].to_numpy(float), train[response].to_numpy(float)
            # NGBoost's own early stopping on its own validation fifth, as the network has
            cut = int(0.8 * len(x_train))
            boosted.fit(x_train[:cut], y_train[:cut], X_val=x_train[cut:], Y_val=y_train[cut:],
                        early_stopping_rounds=50)  # fmt: skip
            predicted = boosted.pred_dist(test[covariates].to_numpy(float))
            ngboost_nll = float(
                -stats.norm.logpdf(test[response], predicted.params["loc"], predicted.params["scale"]).mean()
            )
        scores = {
            "network": network_evaluation.test_mean_nll,
            "linear": linear_evaluation.test_mean_nll,
            "NGBoost": ngboost_nll,
        }
        print(f"{name:9s} {len(train):>4d}/{len(test):<5d} {scores['network']:9.4f} {scores['linear']:9.4f} "
              f"{scores['NGBoost']:9.4f}")  # fmt: skip
        for model, value in scores.items():
            rows.append({"section": "network test NLL", "name": f"{name} {model}", "n": len(train), "value": value,
                         "note": "test mean NLL"})  # fmt: skip
    return rows


def _throughput_data(rows: int, features: int) -> tuple[np.ndarray, np.ndarray]:
    generator = np.random.default_rng(0)
    x = generator.standard_normal((rows, features)).astype(np.float32)
    y = (np.sin(x[:, 0]) + x[:, 1] * x[:, 2] / 2 + np.exp(x[:, 3] / 3) * generator.standard_normal(rows)).astype(
        np.float32
    )
    return x, y


def _hand_written_loop(x: np.ndarray, y: np.ndarray, epochs: int, batch: int) -> float:
    """The loop a user writes: an MLP to (loc, log scale), Normal NLL, Adam, shuffled mini-batches."""
    torch.manual_seed(0)
    features = torch.as_tensor(x)
    features = (features - features.mean(0)) / features.std(0)
    target = torch.as_tensor(y)
    network = torch.nn.Sequential(
        torch.nn.Linear(x.shape[1], 64), torch.nn.ReLU(), torch.nn.Linear(64, 64), torch.nn.ReLU(),
        torch.nn.Linear(64, 2),
    )  # fmt: skip
    optimizer = torch.optim.Adam(network.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(len(target), generator=generator)
        for first in range(0, len(target), batch):
            index = order[first : first + batch]
            out = network(features[index])
            loss = -torch.distributions.Normal(out[:, 0], out[:, 1].exp()).log_prob(target[index]).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return time.perf_counter() - start


def _nllflow_training(x: np.ndarray, y: np.ndarray, epochs: int, batch: int) -> tuple[float, float]:
    """The same network, batch size and epochs through nllflow's training loop (no validation rows,
    so no extra passes): the whole `fit_network` call after the data are on the device, and its
    epochs alone (from the trace's step times)."""
    from nllflow.data.formulas import build_design
    from nllflow.families import get_family
    from nllflow.fitting.mle import FitSettings
    from nllflow.fitting.network import fit_network
    from nllflow.likelihood.observations import Observations
    from nllflow.models.network import Architecture, NetworkModel, Training

    columns = [f"x{i}" for i in range(x.shape[1])]
    frame = pd.DataFrame(x.astype(np.float64), columns=columns)
    inputs = build_design("network", " + ".join(columns), frame)
    model = NetworkModel(get_family("normal"), None, inputs, Architecture("mlp", (64, 64), "relu", 0.0),
                         ("loc", "scale"), {}, {}, {}, 0)  # fmt: skip
    features = {
        name: torch.as_tensor(v, dtype=torch.float32) for name, v in model.features(model.design_matrices()).items()
    }
    observations = Observations(torch.as_tensor(y), features=features)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = fit_network(model, observations, None, settings=FitSettings("adam", lr=1e-3, max_steps=epochs),
                             training=Training(batch_size=batch))  # fmt: skip
    return time.perf_counter() - start, result.step_times[-1] - result.step_times[0]


def throughput(quick: bool) -> list[dict[str, Any]]:
    rows_count = 100_000 if quick else THROUGHPUT_ROWS
    x, y = _throughput_data(rows_count, THROUGHPUT_FEATURES)
    _hand_written_loop(x[:5000], y[:5000], 1, THROUGHPUT_BATCH)  # warm-up of both sides
    _nllflow_training(x[:5000], y[:5000], 1, THROUGHPUT_BATCH)
    plain = _hand_written_loop(x, y, THROUGHPUT_EPOCHS, THROUGHPUT_BATCH)
    # max_steps epochs of training after the evaluation at the start
    whole, ours = _nllflow_training(x, y, THROUGHPUT_EPOCHS, THROUGHPUT_BATCH)
    processed = rows_count * THROUGHPUT_EPOCHS
    ratio = ours / plain
    print(f"hand-written loop {processed / plain:12,.0f} rows/s   nllflow {processed / ours:12,.0f} rows/s   "
          f"overhead {100 * (ratio - 1):+.1f} %  ({rows_count:,d} rows x {THROUGHPUT_FEATURES}, batch "
          f"{THROUGHPUT_BATCH}, {THROUGHPUT_EPOCHS} epochs, float32, {torch.get_num_threads()} threads); "
          f"around the epochs: {whole - ours:.2f} s (start fit, first and last NLL)")  # fmt: skip
    return [
        {
            "section": "network throughput",
            "name": "mlp 64x64",
            "n": rows_count,
            "nllflow_s": ours,
            "scipy_s": plain,
            "ratio": ratio,
            "value": processed / ours,
            "target": "≤ 1.10× a hand-written loop",
            "met": bool(ratio <= 1.10),
            "note": f"{processed / ours:,.0f} vs {processed / plain:,.0f} rows/s",
        }
    ]
