"""The result tables as text: what `nllflow fit`, `nllflow run` and `nllflow compare` print, and
what the Python API's `summary()` returns, made by one function each from the flows' summaries
(the dictionaries of the CLI's `--json`)."""

from __future__ import annotations

import math
from typing import Any

from nllflow.spec import ComparisonSpec, ExperimentSpec


def number(value: Any, digits: int = 6) -> str:
    return "-" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.{digits}g}"


def _where_recorded(summary: dict, what: str) -> list[str]:
    """Where the run is in MLflow and how to open it (nothing for a fit that was not recorded)."""
    from nllflow.tracking.store import ui_command

    run_id = summary.get("parent_run_id") or summary.get("run_id")
    if not run_id:
        return []
    return [
        f"{what} {run_id} in experiment '{summary['experiment']}'",
        f"open the UI: {ui_command(summary.get('tracking_uri'), summary.get('experiment_id'))}",
    ]


def fit_report(summary: dict) -> str:
    """One fit: the verdict, the estimates with standard errors and 95 % intervals, NLL, AIC, BIC,
    the bootstrap, goodness of fit, notes, held-out NLL, and where it was recorded."""
    verdict = "converged" if summary["converged"] else "NOT converged"
    lines = [
        f"{summary['family']} fit, n={summary.get('n', '?')}: {verdict} ({summary['reason']}) "
        f"after {summary['steps']} {summary['optimizer']} steps",
        *_network_lines(summary),
        *_coefficient_tables(summary),
    ]
    if summary["params"]:
        lines.append(f"{'parameter':16s} {'estimate':>14s} {'SE':>12s}   95% CI")
    for label, value in summary["params"].items():
        if label in summary["fixed"]:
            lines.append(f"{label:16s} {number(value):>14s} {'(fixed)':>12s}")
            continue
        low, high = (summary.get("ci95") or {}).get(label) or (None, None)
        se = (summary.get("stderr") or {}).get(label)
        interval = f"[{number(low)}, {number(high)}]" if low is not None else "-"
        lines.append(f"{label:16s} {number(value):>14s} {number(se):>12s}   {interval}")
    lines.append(
        f"NLL {number(summary['nll'])}   mean NLL {number(summary['mean_nll'])}   "
        f"AIC {number(summary.get('aic'))}   BIC {number(summary.get('bic'))}"
    )
    boot = summary.get("bootstrap")
    if boot:
        lines.append(
            f"{boot['kind']} bootstrap, {boot['converged']}/{boot['replicates']} refits converged: "
            f"{boot['level']:.0%} percentile intervals"
        )
        for label, (low, high) in boot["intervals"].items():
            lines.append(f"{label:16s} [{number(low)}, {number(high)}]   bootstrap SE {number(boot['stderr'][label])}")
    if summary.get("gof"):
        pvalues = (boot or {}).get("gof_pvalue") or {}
        lines.append(
            "goodness of fit: "
            + "  ".join(
                f"{k}={number(v)}" + (f" (p={number(pvalues[k])})" if k in pvalues else "")
                for k, v in summary["gof"].items()
            )
        )
    if summary.get("information", "ok") != "ok":
        lines.append(f"note: {summary['information']}")
    if summary.get("heldout_nll") is not None:
        lines.append(f"held-out NLL {number(summary['heldout_nll'])} (mean {number(summary['heldout_mean_nll'])})")
    if summary.get("test_nll") is not None:
        lines.append(f"test NLL {number(summary['test_nll'])} (mean {number(summary['test_mean_nll'])})")
    return "\n".join(lines + _where_recorded(summary, "MLflow run"))


def _network_lines(summary: dict) -> list[str]:
    """A network's outputs, inputs and architecture, its epochs and validation NLL."""
    network = summary.get("network")
    if not network:
        return []
    architecture = summary["architecture"]
    hidden = "x".join(map(str, architecture["hidden"])) or "no hidden layer"
    links = ", ".join(f"{name} ({summary['links'][name]} link)" for name in network["outputs"])
    lines = [
        f"network {architecture['name']} [{hidden}, {architecture['activation']}"
        + (f", dropout {architecture['dropout']:g}" if architecture["dropout"] else "")
        + f"; {architecture['weights']} weights]: {links} ~ {network['terms']}",
    ]
    if summary.get("validation_mean_nll") is not None:
        lines.append(f"validation mean NLL {number(summary['validation_mean_nll'])} at the weights kept")
    return lines


def _coefficient_tables(summary: dict) -> list[str]:
    """A regression's table per parameter with a formula: estimate, SE, z, p-value and 95 % interval."""
    lines = []
    rows = summary.get("coefficient_table") or []
    for name, formula in (summary.get("formulas") or {}).items():
        if name not in summary.get("coefficients", {}):
            continue
        lines.append(f"{name} ~ {formula}   (link: {summary['links'][name]})")
        lines.append(f"  {'term':24s} {'estimate':>13s} {'SE':>11s} {'z':>8s} {'p':>9s}   95% CI")
        for row in rows:
            if row["parameter"] == name:
                lines.append(
                    f"  {row['term']:24s} {number(row['estimate']):>13s} {number(row['stderr']):>11s} "
                    f"{number(row['z'], 4):>8s} {number(row['p_value'], 3):>9s}   "
                    f"[{number(row['ci95_low'])}, {number(row['ci95_high'])}]"
                )
    if summary.get("deviance") is not None:
        lines.append(f"global deviance {number(summary['deviance'], 10)}   GAIC(3) {number(summary.get('gaic_3'), 10)}")
    if summary.get("dropped"):
        lines.append(f"{summary['dropped']} row(s) with missing values left out (--drop-missing)")
    return lines


def sweep_report(spec: ExperimentSpec, summary: dict) -> str:
    """A sweep: one row per configuration (status, NLL, a network's validation mean NLL, steps,
    convergence, estimates), the truth of simulated data above them, the failures, the best
    configuration (by what the sweep ranks by) and the parent run."""
    truth = {}
    if spec.data.simulate is not None:
        truth = {k: v for k, v in spec.data.simulate.params.items() if isinstance(v, (int, float))}
    lines = [f"sweep '{spec.name}': {len(summary['runs'])} configurations"]
    estimate_columns = sorted({k for row in summary["runs"] for k in row if k.startswith("estimate.")})
    ranked = spec.rank_by
    validated = ranked != "nll"
    header = f"{'configuration':28s} {'status':9s} {'NLL':>14s}" + (f" {'val mean NLL':>12s}" if validated else "")
    header += f" {'steps':>6s} {'conv':>5s}"
    lines.append(header + "".join(f" {c.removeprefix('estimate.'):>14s}" for c in estimate_columns))
    if truth:
        lines.append(
            f"{'(truth)':28s} {'':9s} {'':>14s}{' ' * 13 if validated else ''} {'':>6s} {'':>5s}"
            + "".join(f" {number(truth.get(c.removeprefix('estimate.'))):>14s}" for c in estimate_columns)
        )
    for row in summary["runs"]:
        line = f"{row['run_name']:28s} {row['status']:9s} {number(row.get('nll')):>14s}"
        if validated:
            line += f" {number(row.get(ranked)):>12s}"
        line += f" {number(row.get('steps')):>6s} {'yes' if row.get('converged') else 'no':>5s}"
        lines.append(line + "".join(f" {number(row.get(c)):>14s}" for c in estimate_columns))
    lines += [f"failed: {name}: {reason}" for name, reason in summary["failed"].items()]
    best = next((r for r in summary["runs"] if r["run_id"] == summary["best_run_id"]), None)
    if best is not None:
        measure = "validation mean NLL" if validated else "NLL"
        lines.append(f"best: {best['run_name']} ({measure} {number(best[ranked])}), run {best['run_id']}")
    return "\n".join(lines + _where_recorded(summary, "parent run"))


def comparison_report(spec: ComparisonSpec, summary: dict) -> str:
    """A comparison: the families ranked by AIC with ΔAIC, BIC, KS/CvM/AD (and their bootstrap
    p-values) and the estimates, the notes, the best family and the parent run."""
    ranking = summary["ranking"]
    lines = [f"comparison '{spec.name}': {len(ranking)} families, ranked by AIC"]
    with_p = any(row["pvalue"] for row in ranking)
    header = f"{'rank':>4s}  {'family':16s} {'AIC':>12s} {'dAIC':>9s} {'BIC':>12s} {'KS':>8s} {'CvM':>8s} {'AD':>8s}"
    if with_p:
        header += f" {'p(KS)':>7s} {'p(CvM)':>7s} {'p(AD)':>7s}"  # parametric-bootstrap p-values
    lines.append(header + "  estimates")
    for row in ranking:
        line = (
            f"{row['rank'] or '-':>4}  {row['family']:16s} {number(row['aic']):>12s} {number(row['delta_aic']):>9s} "
            f"{number(row['bic']):>12s} {number(row['ks']):>8s} {number(row['cvm']):>8s} {number(row['ad']):>8s}"
        )
        if with_p:
            line += "".join(f" {number(row['pvalue'].get(k), 3):>7s}" for k in ("ks", "cvm", "ad"))
        estimates = ", ".join(f"{k}={number(v)}" for k, v in row["params"].items())
        lines.append(line + "  " + (estimates if row["status"] == "FINISHED" else f"failed: {row['reason']}"))
    lines += [f"note: {name}: {reason}" for name, reason in {**summary["skipped"], **summary["notes"]}.items()]
    best = ranking[0] if ranking and ranking[0]["rank"] == 1 else None
    if best is not None:
        lines.append(f"best: {best['family']} (AIC {number(best['aic'])}), run {best['run_id']}")
    return "\n".join(lines + _where_recorded(summary, "parent run"))
