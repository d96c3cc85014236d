"""The compare flow: several families fitted to one data set and ranked by AIC; one MLflow parent run
with a child per family, the ranking as `comparison.parquet` and the overlaid diagnostic plots on
the parent.

Ranked by AIC, not by a goodness-of-fit statistic: a KS distance ignores how many parameters bought
the fit and is blind in the tails (the `fitter` package's known failure). KS, Cramér–von Mises and
Anderson–Darling are reported beside it.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd
from prefect import flow, get_run_logger, runtime
from prefect.task_runners import ThreadPoolTaskRunner

from nllflow.families import get_family
from nllflow.flows.fit import flow_run_tags, started_by_a_deployment
from nllflow.flows.recovery import recover_abandoned_runs
from nllflow.flows.sweep import THREADS, fit_as_tasks
from nllflow.pipeline import prefect_tasks as steps
from nllflow.pipeline.steps import data_key
from nllflow.spec import ComparisonSpec, resolve_spec
from nllflow.tracking.recorder import Tracker, run_key
from nllflow.tracking.store import tracking_uri


@flow(name="compare", flow_run_name="{spec.name} compare", task_runner=ThreadPoolTaskRunner(max_workers=THREADS))
def compare(spec: ComparisonSpec) -> dict[str, Any]:
    """Plan the families (a group keeps those whose support holds the data), fit each one as the
    fit flow's steps on a thread, then rank them on the parent run. A family that fails or
    diverges is listed as failed; the comparison itself completes."""
    spec = resolve_spec(spec, restricted=started_by_a_deployment())
    recover_abandoned_runs()
    plan = steps.plan_comparison(spec)
    loaded = {data_key(c): data for c in plan.configurations for data in steps.check(c).values()}
    families = [configuration.family for configuration in plan.configurations]
    parent = steps.start_comparison(spec, families, flow_run_tags(), run_key(str(runtime.flow_run.id), "comparison"))
    try:
        missing = fit_as_tasks(plan.configurations, parent, loaded)
        summary = steps.finish_comparison(parent, missing, next(iter(loaded.values())))
    except BaseException as error:
        steps.fail_run(parent, f"the comparison stopped: {type(error).__name__}: {error}"[:500])
        raise
    for name, reason in summary.failed.items():
        get_run_logger().warning("%s failed: %s", name, reason)
    ranking = ranking_rows(summary.table)
    return {
        "experiment": spec.name,
        "experiment_id": Tracker().experiment_id(spec.name),
        "tracking_uri": tracking_uri(),
        "parent_run_id": summary.parent_run_id,
        "best_run_id": summary.best_run_id,
        "best_family": ranking[0]["family"] if ranking and ranking[0]["rank"] == 1 else None,
        "failed": summary.failed,
        "skipped": plan.skipped,
        "notes": plan.notes,
        "ranking": ranking,
    }


def ranking_rows(table: pd.DataFrame) -> list[dict[str, Any]]:
    """The comparison table as the CLI shows it: one row per family, best AIC first, with ΔAIC,
    BIC, the EDF statistics (and their bootstrap p-values) and the estimates."""
    rows = table.to_dict(orient="records")
    best = min((row["aic"] for row in rows if _number(row.get("rank"))), default=math.nan)
    ranking = []
    for row in rows:
        ranking.append(
            {
                "rank": int(row["rank"]) if _number(row.get("rank")) else None,
                "family": row["run_name"],
                "run_id": row["run_id"],
                "status": row["status"],
                "aic": row["aic"],
                "delta_aic": row["aic"] - best,
                "bic": row["bic"],
                "nll": row["nll"],
                **{name: row.get(f"gof_{name}", math.nan) for name in ("ks", "cvm", "ad")},
                "pvalue": {
                    name: row[f"gof_pvalue_{name}"]
                    for name in ("ks", "cvm", "ad")
                    if _number(row.get(f"gof_pvalue_{name}"))
                },
                "params": _estimates(row),
                "reason": row.get("reason") or "",
            }
        )
    return ranking


def _estimates(row: dict[str, Any]) -> dict[str, float]:
    """The row's estimates in its family's parameter order (the table holds every family's columns)."""
    estimates = {k.removeprefix("estimate."): v for k, v in row.items() if k.startswith("estimate.") and _number(v)}
    if row.get("family") is None:
        return estimates
    order = get_family(row["family"]).params

    def position(label: str) -> int:
        # a regression's coefficients are `loc:x`; a vector's components are numbered: logits_1, logits_2
        name = label.split(":", 1)[0]
        name = name if name in order else name.rsplit("_", 1)[0]
        return order.index(name) if name in order else len(order)

    return dict(sorted(estimates.items(), key=lambda item: position(item[0])))


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)
