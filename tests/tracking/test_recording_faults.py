"""Idempotent recording under transient faults: each MLflow call the recorder makes fails once (before
the call reaches the store, or after it did and the answer was lost), the recording tasks retry,
and every configuration still has exactly one run, with the right status and complete histories."""

from __future__ import annotations

import threading

import pytest
from mlflow.tracking import MlflowClient

from nllflow.pipeline import prefect_tasks
from nllflow.spec import parse_spec
from nllflow.tracking import recorder
from nllflow.tracking.recorder import KEY_TAG, PARENT_TAG, Tracker, run_key

CALLS = ("create_run", "log_batch", "log_inputs", "log_artifacts", "set_terminated", "search_runs")
# the metric histories go into a SQL store's table directly (recorder._insert_metrics), not by log_batch
DIRECT = ("_insert_metrics",)


class TransientFault(ConnectionError):
    """What a dropped connection looks like to the recorder."""


class Faults:
    """Make the 1st and 3rd call of one MlflowClient method fail, before or after it ran."""

    def __init__(self, method: str, when: str, failing: tuple[int, ...] = (1, 3)):
        self.method, self.when, self.failing = method, when, failing
        self.calls, self.failed = 0, 0
        self.lock = threading.Lock()
        self.owner = recorder if method in DIRECT else MlflowClient
        self.original = getattr(self.owner, method)

    def install(self, monkeypatch) -> None:
        faults = self

        def wrapper(client, *args, **kwargs):
            with faults.lock:
                faults.calls += 1
                fail = faults.calls in faults.failing
                faults.failed += fail
            if fail and faults.when == "before":
                raise TransientFault(f"injected: {faults.method} did not reach the store")
            result = faults.original(client, *args, **kwargs)
            if fail:
                raise TransientFault(f"injected: {faults.method} ran, its answer was lost")
            return result

        monkeypatch.setattr(self.owner, self.method, wrapper)


def _sweep_spec(name: str):
    return parse_spec(
        {
            "name": name,
            "family": "gamma",
            "data": {"simulate": {"params": {"concentration": 2.5, "rate": 1.5}, "n": 300, "seed": 3}},
            "init": {"concentration": 0.8, "rate": 2.0},
            "optimizer": {"name": "adam", "max_steps": 30},
            # 1e6 diverges: its run must be FAILED, once, however often its recording is retried
            "sweep": {"lr": [0.01, 0.1, 1e6]},
            "device": "cpu",
        }
    )


@pytest.fixture
def fast_retries(monkeypatch):
    """The recording tasks retry at once (their 2 s delay is for real outages)."""
    for name in ("record", "record_failure", "start_sweep", "finish_sweep", "fail_run"):
        monkeypatch.setattr(prefect_tasks, name, getattr(prefect_tasks, name).with_options(retry_delay_seconds=0))


@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("method", CALLS + DIRECT)
def test_a_sweep_survives_one_transient_fault_in_each_mlflow_call(tracker, fast_retries, monkeypatch, method, when):
    from nllflow.flows.sweep import sweep

    spec = _sweep_spec(f"faults-{method}-{when}")
    faults = Faults(method, when)
    faults.install(monkeypatch)
    summary = sweep(spec)
    monkeypatch.undo()
    assert faults.failed == 2, f"{method} was called {faults.calls} times"

    client = Tracker().client
    experiment = client.get_experiment_by_name(spec.name)
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    parents = [run for run in runs if PARENT_TAG not in run.data.tags]
    children = [run for run in runs if PARENT_TAG in run.data.tags]
    # one parent, one child per configuration: no second run for a retried recording
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sorted(run.info.run_name for run in children) == sorted(c.label() for c in spec.configurations())
    assert len({run.data.tags[KEY_TAG] for run in children}) == len(children)
    expected = {c.label(): "FAILED" if c.optimizer.lr == 1e6 else "FINISHED" for c in spec.configurations()}
    assert {run.info.run_name: run.info.status for run in children} == expected
    assert set(summary["failed"]) == {name for name, status in expected.items() if status == "FAILED"}
    for run in children:
        if run.info.status != "FINISHED":
            assert run.data.tags["reason"].startswith("diverged")
            continue
        steps = int(run.data.metrics["steps"])
        for key in ("nll", "mean_nll", "concentration", "grad_rate"):
            history = client.get_metric_history(run.info.run_id, key)
            # complete: one point per step, none twice
            assert sorted(point.step for point in history) == list(range(steps + 1)), key
        assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"trace.parquet", "fit.parquet", "plots"}
    assert not client.search_runs([experiment.experiment_id], "attributes.status = 'RUNNING'")


def test_recording_the_same_key_twice_is_one_run(tracker):
    """The find-or-create itself, without Prefect: a second record of a finished run changes nothing."""
    from nllflow.pipeline.steps import run_core

    spec = _sweep_spec("faults-same-key").configurations()[0]
    fitted = run_core(spec)
    key = run_key("a flow run", spec.label())
    first = tracker.record_fit(spec, *fitted, key=key)
    second = tracker.record_fit(spec, *fitted, key=key)
    assert first == second
    runs = tracker.client.search_runs([tracker.experiment_id(spec.name)], f"tags.`{KEY_TAG}` = '{key}'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    history = tracker.client.get_metric_history(first, "nll")
    assert len(history) == len(fitted[2].trace)


def test_a_configuration_fitted_again_completes_its_half_written_run_without_doubling_histories(tracker):
    """A rescheduled Dask task fits again (the same values, at other times) and records into the run
    the killed attempt left half-written: one run, one point per step."""
    from nllflow.pipeline.steps import run_core
    from nllflow.tracking.recorder import _trace_metrics

    spec = _sweep_spec("faults-fitted-again").configurations()[0]
    first = run_core(spec)
    key = run_key("a parent run", spec.label())
    run_id = tracker.run_for(spec.name, key, spec.label(), {}, None).info.run_id
    half = _trace_metrics(first[2], int(first[2].started_at * 1000))
    tracker._log_metrics(run_id, half[: len(half) // 2])  # the attempt killed while it recorded
    again = run_core(spec)
    assert again[2].started_at != first[2].started_at
    assert tracker.record_fit(spec, *again, key=key) == run_id
    runs = tracker.client.search_runs([tracker.experiment_id(spec.name)], f"tags.`{KEY_TAG}` = '{key}'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    trace = again[2].trace
    for column in ("nll", "concentration", "grad_rate"):
        history = sorted(tracker.client.get_metric_history(run_id, column), key=lambda point: point.step)
        assert [point.step for point in history] == trace["step"].tolist()
        assert [point.value for point in history] == trace[column].tolist()


def test_two_runs_that_got_one_key_settle_on_one(tracker):
    """Two creates of one configuration (a lost answer retried, two attempts at once): the recording
    keeps the run with the smallest id and deletes the other."""
    from nllflow.pipeline.steps import run_core

    spec = _sweep_spec("faults-two-runs").configurations()[0]
    key = run_key("another parent", spec.label())
    experiment = tracker.experiment_id(spec.name)
    created = sorted(tracker.client.create_run(experiment, tags={KEY_TAG: key}).info.run_id for _ in range(2))
    run_id = tracker.record_fit(spec, *run_core(spec), key=key)
    assert run_id == created[0]
    runs = tracker.client.search_runs([experiment], f"tags.`{KEY_TAG}` = '{key}'")
    assert [run.info.run_id for run in runs] == [created[0]] and runs[0].info.status == "FINISHED"
    assert tracker.client.get_run(created[1]).info.lifecycle_stage == "deleted"


def test_metrics_inserted_directly_read_back_as_log_batch_writes_them(tracker):
    """The oracle is MLflow's own log_batch: the same points (NaN, ±inf, ties in step, out of
    order) give the same histories and the same latest values; a retry doubles nothing; a
    deleted run takes no more points."""
    import math

    from mlflow.entities import Metric
    from mlflow.exceptions import MlflowException

    client = tracker.client
    experiment_id = tracker.experiment_id("direct-metrics")
    values = [(0, 3.0), (1, math.nan), (2, math.inf), (2, 1.0), (1, 5.0)]
    points = [Metric("loss", value, 1000 + i, step) for i, (step, value) in enumerate(values)]
    points += [Metric("grad", -math.inf, 5, 0), Metric("grad", 2.0, 4, 0)]
    direct, batch = (client.create_run(experiment_id).info.run_id for _ in range(2))
    store = client._tracking_client.store
    assert recorder._insert_metrics(store, direct, points)
    assert recorder._insert_metrics(store, direct, points)  # a retried task's second write
    client.log_batch(batch, metrics=points)

    def history(run_id: str, key: str) -> list:
        return sorted(
            (m.step, m.timestamp, "nan" if math.isnan(m.value) else m.value)
            for m in client.get_metric_history(run_id, key)
        )

    for key in ("loss", "grad"):
        assert history(direct, key) == history(batch, key)
    assert len(history(direct, "loss")) == len(values)
    assert (
        client.get_run(direct).data.metrics
        == client.get_run(batch).data.metrics
        == {
            "loss": 1.0,
            "grad": -1.7976931348623157e308,
        }
    )
    client.delete_run(direct)
    with pytest.raises(MlflowException, match="active"):
        recorder._insert_metrics(store, direct, points)
