"""The `nllflow` command: runs the same Prefect flows as the deployments, on the embedded default
(a Prefect server that nllflow starts in the background once and reuses, see `nllflow.flows.server`,
and a SQLite MLflow store in nllflow's home; no server to start by hand).

Exit codes: 0 fitted, 1 diverged or failed, 2 bad input. Errors are one line; --debug shows the
traceback. Prefect and MLflow are imported only once the input has been checked, so bad input is
refused in about a second (a server that a refused command started meanwhile is stopped again).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import math
import os
import signal
import sys
from pathlib import Path
from typing import Any, Iterator, Sequence, TextIO

from nllflow.errors import InputError

# the commands that run Prefect flows (on the server of nllflow.flows.server)
FLOW_COMMANDS = frozenset({"fit", "run", "compare"})


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
    # the choices of nllflow.fitting.mle.OPTIMIZERS, spelled out: importing it imports torch
    parser.add_argument(
        "--optimizer",
        choices=["lbfgs", "adam", "sgd", "newton"],
        help="default: lbfgs (adam for a network); newton: damped Newton steps (IRLS for a regression), no --lr",
    )
    parser.add_argument("--max-steps", type=int, default=500, help="the step budget (a network's: epochs)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument(
        "--dtype", choices=["float64", "float32"], help="default: float64 (float32 for a network on CUDA)"
    )
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
    _add_formula_options(fit)
    _add_network_options(fit)
    fit.add_argument(
        "--lr",
        type=_positive_float,
        help="learning rate (default: lbfgs 1, adam 0.05, sgd 0.1; a network's: adam 0.001, sgd 0.01)",
    )
    fit.add_argument("--holdout", type=float, default=0.0, help="fraction held out for the held-out NLL")
    fit.add_argument("--test-data", metavar="PATH", help="a CSV or Parquet file with the same columns: its test NLL")
    _add_run_options(fit, "nllflow-fit")
    fit.add_argument("--plots", metavar="DIR", help="also write the diagnostic plots (PNG) into DIR")
    fit.add_argument("--json", action="store_true", help="print the result as one JSON object (last line)")
    fit.set_defaults(handler=_fit_command)

    compare = commands.add_parser("compare", help="fit several families to one data set and rank them by AIC")
    _add_data_options(compare)
    _add_formula_options(compare)
    compare.add_argument(
        "--families",
        required=True,
        metavar="A,B,C",
        help="family names, or a group: continuous or discrete (those whose support holds the data)",
    )
    _add_run_options(compare, "nllflow-compare")
    compare.add_argument(
        "--plots", metavar="DIR", help="also write the overlaid plots into DIR (each family's in DIR/FAMILY)"
    )
    compare.add_argument("--json", action="store_true", help="print the ranking as one JSON list (last line)")
    compare.set_defaults(handler=_compare_command)

    run = commands.add_parser("run", help="run an experiment spec (a sweep when it lists several learning rates)")
    run.add_argument("spec", help="YAML file in experiments/")
    run.add_argument("--set", action="append", metavar="KEY=VALUE", dest="overrides", help="override a spec key")
    run.add_argument("--json", action="store_true")
    run.set_defaults(handler=_run_command)

    predict = commands.add_parser(
        "predict", help="each row's parameters, mean and quantiles from a regression or network run"
    )
    predict.add_argument(
        "--run", required=True, metavar="RUN_ID", help="an MLflow run of a fit with formulas or a network"
    )
    predict.add_argument("--data", required=True, help="CSV or Parquet file with the covariates")
    predict.add_argument("--quantiles", metavar="P,P,...", help="probabilities, e.g. 0.05,0.5,0.95")
    predict.add_argument("--output", metavar="PATH", help="write CSV or Parquet here (default: CSV on stdout)")
    predict.set_defaults(handler=_predict_command)

    families = commands.add_parser("families", help="list the registered families")
    families.set_defaults(handler=_families_command)

    server = commands.add_parser("server", help="the Prefect server nllflow runs in the background: status, stop")
    server.add_argument("action", choices=["status", "stop"])
    server.set_defaults(handler=_server_command)
    return parser


def _add_formula_options(parser: argparse.ArgumentParser) -> None:
    """Formulas and links: a regression (shared by `fit` and `compare`)."""
    parser.add_argument(
        "--formula",
        action="append",
        metavar="'PARAM ~ TERMS'",
        help="a linear predictor for a parameter (repeatable): 'mean ~ x + C(group)'",
    )
    parser.add_argument(
        "--link",
        action="append",
        metavar="PARAM=NAME",
        help="the link of a parameter with a formula: identity, log, sqrt, logit, probit, cloglog, inverse",
    )


def _hidden_sizes(text: str) -> list[int]:
    """`64,64` into [64, 64]; `none` (or an empty string) is no hidden layer."""
    if text.strip().lower() in ("", "none"):
        return []
    sizes = []
    for part in text.split(","):
        try:
            size = int(part)
        except ValueError:
            size = 0
        if size <= 0 or str(size) != part.strip():
            raise argparse.ArgumentTypeError(
                f"hidden sizes are positive whole numbers like 64,64 (or none), got {text!r}"
            )
        sizes.append(size)
    return sizes


def _add_network_options(parser: argparse.ArgumentParser) -> None:
    """A network parameter model and its training (`fit` only)."""
    network = parser.add_argument_group("network (a neural network outputs the parameters)")
    network.add_argument(
        "--network",
        metavar="'TERMS'",
        help="the network's inputs as a formula right-hand side, 'x1 + x2 + C(group)'; its outputs are the "
        "free parameters without --formula ('loc,scale ~ TERMS' names them)",
    )
    network.add_argument("--architecture", default="mlp", help="a registered network (default: mlp)")
    network.add_argument("--hidden", type=_hidden_sizes, default=[64, 64], metavar="N,N", help="default: 64,64")
    network.add_argument("--activation", default="relu", help="relu, tanh, gelu, elu, silu or softplus")
    network.add_argument("--dropout", type=float, default=0.0)
    network.add_argument("--weight-decay", type=float, default=0.0)
    network.add_argument("--epochs", type=int, help="the epoch budget (the same as --max-steps)")
    network.add_argument("--batch-size", type=int, help="rows per mini-batch (default: the whole data)")
    network.add_argument("--validation", type=float, default=0.2, help="fraction of rows for early stopping")
    network.add_argument("--patience", type=int, default=20, help="epochs without a better validation NLL")
    network.add_argument("--scheduler", default="none", choices=["none", "plateau", "cosine"])
    network.add_argument("--clip", type=_positive_float, help="clip the gradient norm at this value")
    network.add_argument("--seed", type=int, default=0, help="initial weights, validation split, shuffling")


def _network_section(args: argparse.Namespace) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """The spec's `network` and `training` sections from the options (None without --network)."""
    network_only = {
        "--epochs": args.epochs is not None,
        "--batch-size": args.batch_size is not None,
        "--clip": args.clip is not None,
        "--dropout": args.dropout != 0.0,
        "--weight-decay": args.weight_decay != 0.0,
    }
    if args.network is None:
        given = [option for option, present in network_only.items() if present]
        if given:
            raise InputError(f"{given[0]} trains a network: give --network 'TERMS' too")
        return None, {}
    outputs, tilde, terms = args.network.rpartition("~")
    parameters = [name.strip() for name in outputs.split(",") if name.strip()] if tilde else []
    network = {
        "terms": terms.strip(),
        "parameters": parameters,
        "architecture": args.architecture,
        "hidden": args.hidden,
        "activation": args.activation,
        "dropout": args.dropout,
    }
    training = {
        "batch_size": args.batch_size,
        "validation": args.validation,
        "patience": args.patience,
        "scheduler": args.scheduler,
        "clip": args.clip,
        "weight_decay": args.weight_decay,
        "seed": args.seed,
    }
    return network, training


def _add_data_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="CSV or Parquet file")
    parser.add_argument("--column", help="the column of exact observations")
    parser.add_argument(
        "--censored",
        metavar="LEFT,RIGHT",
        help="two columns instead of --column: equal = exact, LEFT empty = left-censored at RIGHT, "
        "RIGHT empty = right-censored at LEFT, else the interval (LEFT, RIGHT]",
    )
    parser.add_argument("--weights", help="column of non-negative frequency weights")
    parser.add_argument(
        "--drop-missing",
        action="store_true",
        help="leave out rows where a column the fit reads is missing (else they are refused)",
    )


def _add_bootstrap_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bootstrap", type=int, metavar="B", help="B bootstrap refits for percentile intervals")
    parser.add_argument(
        "--bootstrap-kind",
        default="nonparametric",
        choices=["nonparametric", "parametric"],
        help="resample the rows, or draw from the fit (which also gives goodness-of-fit p-values)",
    )
    parser.add_argument("--bootstrap-seed", type=int, default=0)


def _data_section(args: argparse.Namespace) -> dict[str, Any]:
    if args.column is None and args.censored is None:
        raise InputError("give --column COL, or --censored LEFT,RIGHT for censored data")
    censored = None if args.censored is None else [part.strip() for part in args.censored.split(",")]
    return {
        "path": args.data,
        "column": args.column,
        "censored": censored,
        "weights": args.weights,
        "drop_missing": args.drop_missing,
    }


def _bootstrap_section(args: argparse.Namespace) -> dict[str, Any] | None:
    if args.bootstrap is None:
        return None
    return {"replicates": args.bootstrap, "kind": args.bootstrap_kind, "seed": args.bootstrap_seed}


def _formulas(items: Sequence[str] | None) -> dict[str, str]:
    """`PARAM ~ TERMS` options into {PARAM: TERMS}."""
    formulas: dict[str, str] = {}
    for item in items or []:
        name, tilde, terms = item.partition("~")
        if not tilde or not name.strip() or not terms.strip():
            raise InputError(f"--formula needs 'PARAM ~ TERMS', got {item!r}")
        if name.strip() in formulas:
            raise InputError(f"--formula gives {name.strip()} twice")
        formulas[name.strip()] = terms.strip()
    return formulas


def _links(items: Sequence[str] | None) -> dict[str, str]:
    links = {}
    for item in items or []:
        name, sep, link = item.partition("=")
        if not sep or not name or not link:
            raise InputError(f"--link needs PARAM=NAME, got {item!r}")
        links[name.strip()] = link.strip()
    return links


def _fit_command(args: argparse.Namespace) -> int:
    from nllflow.spec import parse_spec

    network, training = _network_section(args)
    if args.epochs is not None and args.max_steps != 500 and args.epochs != args.max_steps:
        raise InputError("--epochs and --max-steps are the same budget for a network: give one")
    optimizer = {"lr": args.lr, "max_steps": args.epochs if args.epochs is not None else args.max_steps}
    if args.optimizer is not None:
        optimizer["name"] = args.optimizer
    raw = {
        "name": args.experiment,
        "family": args.family,
        "data": {**_data_section(args), "holdout": args.holdout, "test_path": args.test_data},
        "formulas": _formulas(args.formula),
        "links": _links(args.link),
        "fix": _key_values(args.fix, "--fix"),
        "init": _key_values(args.init, "--init"),
        "optimizer": optimizer,
        "bootstrap": _bootstrap_section(args),
        "device": args.device,
        "dtype": args.dtype,
    }
    if network is not None:
        raw.update(network=network, training=training)
    return _execute(parse_spec(raw, source="arguments"), args.json, args.plots)


def _compare_command(args: argparse.Namespace) -> int:
    from nllflow.api import run_comparison
    from nllflow.report import comparison_report
    from nllflow.spec import parse_comparison

    raw = {
        "name": args.experiment,
        "families": [name.strip() for name in args.families.split(",") if name.strip()],
        "data": _data_section(args),
        "formulas": _formulas(args.formula),
        "links": _links(args.link),
        "optimizer": {"name": args.optimizer or "lbfgs", "max_steps": args.max_steps},
        "bootstrap": _bootstrap_section(args),
        "device": args.device,
        "dtype": args.dtype,
    }
    spec = parse_comparison(raw, source="arguments")
    summary = run_comparison(spec)
    _print_json(summary["ranking"]) if args.json else print(comparison_report(spec, summary))
    if args.plots:
        _write_plots(summary["parent_run_id"], args.plots, {row["family"]: row["run_id"] for row in summary["ranking"]})
    return 0 if summary["best_run_id"] else 1


def _write_plots(run_id: str, folder: str, children: dict[str, str | None] | None = None) -> None:
    """The run's plots (and each child's, in a folder of its name) copied from the tracking store."""
    from pathlib import Path

    from nllflow.tracking.recorder import Tracker

    _render_deferred_plots(sys.stderr)
    tracker = Tracker()
    tracker.download_plots(run_id, Path(folder))
    for name, child in (children or {}).items():
        if child:
            tracker.download_plots(child, Path(folder) / name)


def _run_command(args: argparse.Namespace) -> int:
    from nllflow.spec import load_spec

    return _execute(load_spec(args.spec, args.overrides), args.json)


def _families_command(args: argparse.Namespace) -> int:
    from nllflow.families import FAMILIES, family_names

    for name in family_names():
        family = FAMILIES[name]
        kind = "discrete" if family.discrete else "continuous"
        other = "".join(f"  |  {', '.join(p.params)}" for p in family.parametrisations.values())
        print(f"{name:18s} {kind:11s} {', '.join(family.params)}{other}")
    return 0


def _server_command(args: argparse.Namespace) -> int:
    from nllflow.flows import server

    if args.action == "stop":
        stopped = server.stop()
        print(f"stopped nllflow's Prefect server (pid {stopped['pid']})" if stopped else "nothing was running")
        return 0
    lines, in_use = server.status_lines()
    print("\n".join(lines))
    return 0 if in_use else 1


def _fit_flow():
    from nllflow.flows.fit import fit

    return fit


def _predict_command(args: argparse.Namespace) -> int:
    from pathlib import Path

    from nllflow.data.samples import READERS, read_table

    probabilities = []
    for part in filter(None, (args.quantiles or "").split(",")):
        try:
            probabilities.append(float(part))
        except ValueError:
            raise InputError(f"--quantiles takes probabilities separated by commas, got {part!r}") from None
    if args.output and Path(args.output).suffix.lower() not in READERS:
        raise InputError(f"--output must end in one of {', '.join(READERS)}, got {args.output!r}")
    frame = read_table(Path(args.data))
    from nllflow.tracking.models import predict_run
    from nllflow.tracking.store import check_tracking

    check_tracking()
    predictions = predict_run(args.run, frame, probabilities)
    if not args.output:
        predictions.to_csv(sys.stdout, index=False)
    elif Path(args.output).suffix.lower() == ".csv":
        predictions.to_csv(args.output, index=False)
    else:
        predictions.to_parquet(args.output, index=False)
    return 0


def _execute(spec, as_json: bool, plots: str | None = None) -> int:
    from nllflow.api import preflight, run_flow, run_sweep
    from nllflow.report import fit_report, sweep_report

    if spec.sweep is None:
        preflight(spec)
        state = run_flow(_fit_flow, spec, return_state=True)
        summary = state.result(raise_on_failure=False)
        if isinstance(summary, BaseException):
            raise summary
        _print_json(summary) if as_json else print(fit_report(summary))
        if plots:
            _write_plots(summary["run_id"], plots)
        if state.is_failed():
            print(f"nllflow: fit failed: {summary['reason']}", file=sys.stderr)
            return 1
        return 0
    summary = run_sweep(spec)
    _print_json(summary) if as_json else print(sweep_report(spec, summary))
    return 0 if summary["best_run_id"] else 1


def _print_json(summary: dict) -> None:
    from nllflow.evaluation.summary import jsonable

    print(json.dumps(jsonable(summary), separators=(",", ":")))


def main(argv: Sequence[str] | None = None) -> int:
    """The `nllflow` command: run in the warm runner when one serves it (nllflow.flows.runner),
    else here. A call with `argv` (the API's, the tests') always runs here."""
    if argv is None:
        from nllflow.flows.runner import delegate

        code = delegate(sys.argv[1:])
        if code is not None:
            return code
    command_line = argv is None
    if command_line:
        atexit.register(_end_without_teardown)  # registered first: the last exit handler to run
    with plots_after_the_answer(sys.stderr, after_exit=command_line):
        code = run_in_process(sys.argv[1:] if command_line else argv, claim_early=command_line)
    if command_line:
        _exit_status.append(code)
    return code


_exit_status: list[int] = []


def _end_without_teardown() -> None:
    """A command's process ends here once its answer is out and every other exit handler has run
    (Prefect's and MLflow's flushes): Python's teardown of the modules a command imported (torch,
    MLflow, Prefect, pandas) takes two seconds of CPU and does nothing a command needs (its files
    are closed, its database transactions committed)."""
    if not _exit_status:
        return
    import logging

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(_exit_status[0])


@contextlib.contextmanager
def plots_after_the_answer(errors: TextIO, after_exit: bool = False) -> Iterator[None]:
    """The fits' figures rendered and logged when the command has answered
    (nllflow.tracking.deferred), a line on `errors` for a run whose figures could not be. With
    `after_exit`, in a child process after the command has exited (`_render_after_exit`)."""
    from nllflow.tracking import deferred

    deferred.start(_figures_lock)
    try:
        yield
    finally:
        if not (after_exit and deferred.pending() and _render_after_exit()):
            _render_deferred_plots(errors)


def _figures_lock() -> Path:
    # (the server module's imports, a fifth of a second, only for a command that owes figures)
    from nllflow.flows.server import figures_lock

    return figures_lock()


# a renderer still busy after this long is stuck: it ends, its runs stay tagged pending
RENDER_SECONDS = 600


def _render_after_exit() -> bool:
    """Fork: this process goes on to exit with the command's status, and the child renders the
    figures (a shell's prompt, or a caller reading the output to its end, does not wait for them).
    The child lets go of the command's streams (a failure, or its traceback, is appended to
    plots.log in nllflow's home) and uses one intra-op thread (OpenMP's pool does not survive a
    fork). True in the parent; False, having forked nothing, where fork fails; the child never
    returns."""
    try:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        if os.fork() != 0:
            return True
    except OSError:  # no fork (or a closed pipe): the figures are rendered here, as before
        return False
    from nllflow.flows.runner import streams_to_devnull
    from nllflow.tracking.store import nllflow_home

    try:
        streams_to_devnull()
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
        signal.alarm(RENDER_SECONDS)
        # MLflow's telemetry threads did not survive the fork, but their lock and queue did
        os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
        import torch

        from nllflow.tracking.deferred import run_deferred

        torch.set_num_threads(1)
        failures = run_deferred()
        if failures:
            with open(nllflow_home() / "plots.log", "a") as log:
                _warn_unrecorded(failures, log)
    except BaseException:
        import traceback

        with open(nllflow_home() / "plots.log", "a") as log:
            traceback.print_exc(file=log)
    finally:
        os._exit(0)


def _render_deferred_plots(errors: TextIO) -> None:
    from nllflow.tracking.deferred import run_deferred

    _warn_unrecorded(run_deferred(), errors)


def _warn_unrecorded(failures: Sequence[str], errors: TextIO) -> None:
    for failure in failures:
        print(f"nllflow: warning: a run's plots were not recorded: {failure}", file=errors, flush=True)


def run_in_process(argv: Sequence[str], claim_early: bool = False) -> int:
    """The command `argv` here; with `claim_early`, a command that runs flows claims its Prefect
    server before its imports and input checks (nllflow.flows.server.claim_early)."""
    argv = list(argv)
    debug = "--debug" in argv
    try:
        args = build_parser().parse_args(argv)
        if claim_early and args.command in FLOW_COMMANDS:
            from nllflow.flows import server

            server.claim_early()
            try:
                return args.handler(args)
            finally:
                server.release_early()
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
        print(
            f"nllflow: failed: {type(error).__name__}: {first} (rerun with --debug for the traceback)", file=sys.stderr
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
