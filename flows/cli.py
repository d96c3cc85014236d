"""The `nllflow` command: runs the same Prefect flows as the deployments, on the embedded default
(a temporary Prefect server and a SQLite MLflow store in nllflow's home; no server to start).

Exit codes: 0 fitted, 1 diverged or failed, 2 bad input. Errors are one line; --debug shows the
traceback. Prefect and MLflow are imported only once the input has been checked, so bad input is
refused in about a second.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Any, Sequence

from tasks.errors import InputError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, like every other bad input
        raise InputError(f"{message} (see: {self.prog} --help)")


def _key_values(items: Sequence[str] | None, option: str) -> dict[str, Any]:
    """`name=1.5` or `name=0.1,0.2` (a vector) into {name: value}."""
    values: dict[str, Any] = {}
    for item in items or []:
        name, sep, text = item.partition("=")
        if not sep or not name:
            raise InputError(f"{option} needs name=value, got {item!r}")
        try:
            numbers = [float(part) for part in text.split(",")]
        except ValueError:
            raise InputError(f"{option} {item!r}: value must be a number (or numbers separated by commas)") from None
        values[name] = numbers[0] if len(numbers) == 1 else numbers
    return values


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def _add_run_options(parser: argparse.ArgumentParser, experiment: str) -> None:
    """How to optimise, where, and where to record: shared by `fit` and `compare`."""
    parser.add_argument("--optimizer", default="lbfgs", choices=["lbfgs", "adam", "sgd"])
    parser.add_argument("--max-steps", type=int, default=500)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    parser.add_argument("--experiment", default=experiment, help="MLflow experiment name")
    _add_bootstrap_options(parser)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="nllflow", description="Maximum-likelihood fits as tracked Prefect + MLflow experiments.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    fit = commands.add_parser("fit", help="fit one family to one column of a CSV or Parquet file")
    _add_data_options(fit)
    fit.add_argument("--family", required=True, help="a registered family (see: nllflow families)")
    fit.add_argument("--fix", action="append", metavar="NAME=VALUE", help="hold a parameter fixed (repeatable)")
    fit.add_argument("--init", action="append", metavar="NAME=VALUE", help="start value (repeatable)")
    fit.add_argument("--lr", type=_positive_float, help="learning rate (default: lbfgs 1, adam 0.05, sgd 0.1)")
    fit.add_argument("--holdout", type=float, default=0.0, help="fraction held out for the held-out NLL")
    _add_run_options(fit, "nllflow-fit")
    fit.add_argument("--plots", metavar="DIR", help="also write the diagnostic plots (PNG) into DIR")
    fit.add_argument("--json", action="store_true", help="print the result as one JSON object (last line)")
    fit.set_defaults(handler=_fit_command)

    compare = commands.add_parser("compare", help="fit several families to one data set and rank them by AIC")
    _add_data_options(compare)
    compare.add_argument("--families", required=True, metavar="A,B,C",
                         help="family names, or a group: continuous or discrete (those whose support holds the data)")
    _add_run_options(compare, "nllflow-compare")
    compare.add_argument("--plots", metavar="DIR", help="also write the overlaid plots into DIR (each family's in DIR/FAMILY)")
    compare.add_argument("--json", action="store_true", help="print the ranking as one JSON list (last line)")
    compare.set_defaults(handler=_compare_command)

    run = commands.add_parser("run", help="run an experiment spec (a sweep when it lists several learning rates)")
    run.add_argument("spec", help="YAML file in experiments/")
    run.add_argument("--set", action="append", metavar="KEY=VALUE", dest="overrides", help="override a spec key")
    run.add_argument("--json", action="store_true")
    run.set_defaults(handler=_run_command)

    families = commands.add_parser("families", help="list the registered families")
    families.set_defaults(handler=_families_command)
    return parser


def _add_data_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="CSV or Parquet file")
    parser.add_argument("--column", help="the column of exact observations")
    parser.add_argument("--censored", metavar="LEFT,RIGHT",
                        help="two columns instead of --column: equal = exact, LEFT empty = left-censored at RIGHT, "
                             "RIGHT empty = right-censored at LEFT, else the interval (LEFT, RIGHT]")
    parser.add_argument("--weights", help="column of non-negative frequency weights")


def _add_bootstrap_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bootstrap", type=int, metavar="B", help="B bootstrap refits for percentile intervals")
    parser.add_argument("--bootstrap-kind", default="nonparametric", choices=["nonparametric", "parametric"],
                        help="resample the rows, or draw from the fit (which also gives goodness-of-fit p-values)")
    parser.add_argument("--bootstrap-seed", type=int, default=0)


def _data_section(args: argparse.Namespace) -> dict[str, Any]:
    if args.column is None and args.censored is None:
        raise InputError("give --column COL, or --censored LEFT,RIGHT for censored data")
    censored = None if args.censored is None else [part.strip() for part in args.censored.split(",")]
    return {"path": args.data, "column": args.column, "censored": censored, "weights": args.weights}


def _bootstrap_section(args: argparse.Namespace) -> dict[str, Any] | None:
    if args.bootstrap is None:
        return None
    return {"replicates": args.bootstrap, "kind": args.bootstrap_kind, "seed": args.bootstrap_seed}


def _fit_command(args: argparse.Namespace) -> int:
    from tasks.spec import parse_spec

    raw = {
        "name": args.experiment,
        "family": args.family,
        "data": {**_data_section(args), "holdout": args.holdout},
        "fix": _key_values(args.fix, "--fix"),
        "init": _key_values(args.init, "--init"),
        "optimizer": {"name": args.optimizer, "lr": args.lr, "max_steps": args.max_steps},
        "bootstrap": _bootstrap_section(args),
        "device": args.device,
        "dtype": args.dtype,
    }
    return _execute(parse_spec(raw, source="arguments"), args.json, args.plots)


def _compare_command(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from tasks.spec import ComparisonSpec, format_validation_error

    raw = {
        "name": args.experiment,
        "families": [name.strip() for name in args.families.split(",") if name.strip()],
        "data": _data_section(args),
        "optimizer": {"name": args.optimizer, "max_steps": args.max_steps},
        "bootstrap": _bootstrap_section(args),
        "device": args.device,
        "dtype": args.dtype,
    }
    try:
        spec = ComparisonSpec.model_validate(raw)
    except ValidationError as error:
        raise InputError(format_validation_error(error, "arguments")) from None
    from tasks.experiment import build_problem, load_data, plan_comparison
    from tasks.recording import check_tracking

    plan = plan_comparison(spec)
    build_problem(plan.configurations[0], load_data(plan.configurations[0]))
    check_tracking()
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from flows.compare import compare

    summary = compare(spec)
    _print_json(summary["ranking"]) if args.json else _print_comparison(spec, summary)
    if args.plots:
        _write_plots(summary["parent_run_id"], args.plots, {row["family"]: row["run_id"] for row in summary["ranking"]})
    return 0 if summary["best_run_id"] else 1


def _write_plots(run_id: str, folder: str, children: dict[str, str | None] | None = None) -> None:
    """The run's plots (and each child's, in a folder of its name) copied from the tracking store."""
    from pathlib import Path

    from tasks.recording import Tracker

    tracker = Tracker()
    tracker.download_plots(run_id, Path(folder))
    for name, child in (children or {}).items():
        if child:
            tracker.download_plots(child, Path(folder) / name)


def _run_command(args: argparse.Namespace) -> int:
    from tasks.spec import load_spec

    return _execute(load_spec(args.spec, args.overrides), args.json)


def _families_command(args: argparse.Namespace) -> int:
    from tasks.families import FAMILIES, family_names

    for name in family_names():
        family = FAMILIES[name]
        kind = "discrete" if family.discrete else "continuous"
        print(f"{name:18s} {kind:11s} {', '.join(family.params)}")
    return 0


def preflight(spec) -> None:
    """Everything that can be refused before a flow or a run exists: data, support, parameters,
    and an unreachable tracking server (TrackingUnavailable: exit 1, as it may come back)."""
    from tasks.experiment import build_problem, load_data

    checked = set()
    for configuration in spec.configurations():
        key = configuration.data.model_dump_json() + configuration.optimizer.model_dump_json()
        if key not in checked:
            checked.add(key)
            build_problem(configuration, load_data(configuration))
    from tasks.recording import check_tracking

    check_tracking()


def _execute(spec, as_json: bool, plots: str | None = None) -> int:
    preflight(spec)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    if spec.sweep is None:
        from flows.fit import fit

        state = fit(spec, return_state=True)
        summary = state.result(raise_on_failure=False)
        if isinstance(summary, BaseException):
            raise summary
        _print_json(summary) if as_json else _print_fit(summary)
        if plots:
            _write_plots(summary["run_id"], plots)
        if state.is_failed():
            print(f"nllflow: fit failed: {summary['reason']}", file=sys.stderr)
            return 1
        return 0
    from flows.sweep import sweep

    summary = sweep(spec)
    _print_json(summary) if as_json else _print_sweep(spec, summary)
    return 0 if summary["best_run_id"] else 1


def _print_json(summary: dict) -> None:
    from tasks.evaluation import jsonable

    print(json.dumps(jsonable(summary), separators=(",", ":")))


def _format(value: Any, digits: int = 6) -> str:
    return "-" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.{digits}g}"


def _print_fit(summary: dict) -> None:
    from tasks.recording import ui_command

    verdict = "converged" if summary["converged"] else "NOT converged"
    print(f"{summary['family']} fit, n={summary.get('n', '?')}: {verdict} ({summary['reason']}) "
          f"after {summary['steps']} {summary['optimizer']} steps")
    print(f"{'parameter':16s} {'estimate':>14s} {'SE':>12s}   95% CI")
    for label, value in summary["params"].items():
        if label in summary["fixed"]:
            print(f"{label:16s} {_format(value):>14s} {'(fixed)':>12s}")
            continue
        low, high = (summary.get("ci95") or {}).get(label) or (None, None)
        se = (summary.get("stderr") or {}).get(label)
        interval = f"[{_format(low)}, {_format(high)}]" if low is not None else "-"
        print(f"{label:16s} {_format(value):>14s} {_format(se):>12s}   {interval}")
    print(f"NLL {_format(summary['nll'])}   mean NLL {_format(summary['mean_nll'])}   "
          f"AIC {_format(summary.get('aic'))}   BIC {_format(summary.get('bic'))}")
    boot = summary.get("bootstrap")
    if boot:
        print(f"{boot['kind']} bootstrap, {boot['converged']}/{boot['replicates']} refits converged: "
              f"{boot['level']:.0%} percentile intervals")
        for label, (low, high) in boot["intervals"].items():
            print(f"{label:16s} [{_format(low)}, {_format(high)}]   bootstrap SE {_format(boot['stderr'][label])}")
    if summary.get("gof"):
        pvalues = (boot or {}).get("gof_pvalue") or {}
        print("goodness of fit: " + "  ".join(
            f"{k}={_format(v)}" + (f" (p={_format(pvalues[k])})" if k in pvalues else "") for k, v in summary["gof"].items()
        ))
    if summary.get("information", "ok") != "ok":
        print(f"note: {summary['information']}")
    if summary.get("heldout_nll") is not None:
        print(f"held-out NLL {_format(summary['heldout_nll'])} (mean {_format(summary['heldout_mean_nll'])})")
    print(f"MLflow run {summary['run_id']} in experiment '{summary['experiment']}'")
    print(f"open the UI: {ui_command(summary['tracking_uri'])}")


def _print_sweep(spec, summary: dict) -> None:
    from tasks.recording import ui_command

    truth = {}
    if spec.data.simulate is not None:
        truth = {k: v for k, v in spec.data.simulate.params.items() if isinstance(v, (int, float))}
    print(f"sweep '{spec.name}': {len(summary['runs'])} configurations")
    estimate_columns = sorted({k for row in summary["runs"] for k in row if k.startswith("estimate.")})
    header = f"{'configuration':28s} {'status':9s} {'NLL':>14s} {'steps':>6s} {'conv':>5s}"
    header += "".join(f" {c.removeprefix('estimate.'):>14s}" for c in estimate_columns)
    print(header)
    if truth:
        print(f"{'(truth)':28s} {'':9s} {'':>14s} {'':>6s} {'':>5s}"
              + "".join(f" {_format(truth.get(c.removeprefix('estimate.'))):>14s}" for c in estimate_columns))
    for row in summary["runs"]:
        line = (f"{row['run_name']:28s} {row['status']:9s} {_format(row.get('nll')):>14s} "
                f"{_format(row.get('steps')):>6s} {'yes' if row.get('converged') else 'no':>5s}")
        line += "".join(f" {_format(row.get(c)):>14s}" for c in estimate_columns)
        print(line)
    for name, reason in summary["failed"].items():
        print(f"failed: {name}: {reason}")
    best = next((r for r in summary["runs"] if r["run_id"] == summary["best_run_id"]), None)
    if best is not None:
        print(f"best: {best['run_name']} (NLL {_format(best['nll'])}), run {best['run_id']}")
    print(f"parent run {summary['parent_run_id']} in experiment '{summary['experiment']}'")
    print(f"open the UI: {ui_command()}")


def _print_comparison(spec, summary: dict) -> None:
    from tasks.recording import ui_command

    ranking = summary["ranking"]
    print(f"comparison '{spec.name}': {len(ranking)} families, ranked by AIC")
    with_p = any(row["pvalue"] for row in ranking)
    header = f"{'rank':>4s}  {'family':16s} {'AIC':>12s} {'dAIC':>9s} {'BIC':>12s} {'KS':>8s} {'CvM':>8s} {'AD':>8s}"
    if with_p:
        header += f" {'p(KS)':>7s} {'p(CvM)':>7s} {'p(AD)':>7s}"  # parametric-bootstrap p-values
    print(header + "  estimates")
    for row in ranking:
        line = (f"{row['rank'] or '-':>4}  {row['family']:16s} {_format(row['aic']):>12s} {_format(row['delta_aic']):>9s} "
                f"{_format(row['bic']):>12s} {_format(row['ks']):>8s} {_format(row['cvm']):>8s} {_format(row['ad']):>8s}")
        if with_p:
            line += "".join(f" {_format(row['pvalue'].get(k), 3):>7s}" for k in ("ks", "cvm", "ad"))
        estimates = ", ".join(f"{k}={_format(v)}" for k, v in row["params"].items())
        print(line + "  " + (estimates if row["status"] == "FINISHED" else f"failed: {row['reason']}"))
    for name, reason in {**summary["skipped"], **summary["notes"]}.items():
        print(f"note: {name}: {reason}")
    best = ranking[0] if ranking and ranking[0]["rank"] == 1 else None
    if best is not None:
        print(f"best: {best['family']} (AIC {_format(best['aic'])}), run {best['run_id']}")
    print(f"parent run {summary['parent_run_id']} in experiment '{summary['experiment']}'")
    print(f"open the UI: {ui_command()}")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        args = build_parser().parse_args(argv)
        return args.handler(args)
    except InputError as error:
        if debug:
            raise
        print(f"nllflow: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("nllflow: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # one line for the user; --debug for the traceback
        if debug:
            raise
        first = (str(error).strip().splitlines() or [""])[0]
        print(f"nllflow: failed: {type(error).__name__}: {first} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
