"""`sweep.fan_out: dask`: the spec's address check, and a sweep on a LocalCluster of this host (the
empty address) under the Prefect harness, against the threads mode of the same sweep; and the
threads mode with more configurations than threads. The sweep on a real `dask scheduler` with
workers on other hosts is tests/e2e/test_scale_out.py."""

from __future__ import annotations

import os
import socket

import pandas as pd
import pytest

from nllflow.errors import InputError
from nllflow.spec import parse_spec
from nllflow.tracking.recorder import PARENT_TAG
from nllflow.tracking.store import HOST_TAG, PID_TAG


def sweep_spec(name: str, **sweep) -> dict:
    return {
        "name": name,
        "family": "gamma",
        "data": {"simulate": {"params": {"concentration": 2.5, "rate": 1.5}, "n": 500, "seed": 4}, "holdout": 0.2},
        "init": {"concentration": 0.8, "rate": 2.0},
        "optimizer": {"name": "adam", "max_steps": 40},
        "sweep": {"lr": [0.01, 0.05, 0.2], **sweep},
        "device": "cpu",
        "record_plots": False,
    }


@pytest.mark.parametrize(
    "address", ["", "tcp://127.0.0.1:8786", "tcp://scheduler.internal:8786", "tcp://[::1]:8786", "tcp://10.0.0.5:1"]
)
def test_a_dask_address_is_empty_or_a_tcp_scheduler_address(address):
    spec = parse_spec(sweep_spec("x", fan_out="dask", dask_address=address))
    assert spec.sweep.dask_address == address


@pytest.mark.parametrize(
    "address",
    ["127.0.0.1:8786", "tcp://127.0.0.1", "tcp://127.0.0.1:0", "tcp://host:65536", "http://h:1", "tcp://a b:1"],
)
def test_a_bad_dask_address_is_refused_in_one_line(address):
    with pytest.raises(InputError, match="sweep.dask_address") as error:
        parse_spec(sweep_spec("x", fan_out="dask", dask_address=address))
    assert "\n" not in str(error.value) and "tcp://HOST:PORT" in str(error.value) and repr(address) in str(error.value)


def test_a_dask_address_without_the_dask_fan_out_is_refused():
    with pytest.raises(InputError, match="dask_address is used by fan_out: dask only") as error:
        parse_spec(sweep_spec("x", fan_out="threads", dask_address="tcp://127.0.0.1:8786"))
    assert "\n" not in str(error.value)


@pytest.mark.dask
def test_a_sweep_on_a_local_dask_cluster_records_what_the_threads_mode_records(tracker, tmp_path):
    from nllflow.flows.sweep import sweep

    on_dask = sweep(parse_spec(sweep_spec("test-dask-local", fan_out="dask")))
    in_threads = sweep(parse_spec(sweep_spec("test-dask-threads", fan_out="threads")))
    runs = {}
    for mode, summary in (("dask", on_dask), ("threads", in_threads)):
        assert not summary["failed"]
        assert tracker.client.get_run(summary["parent_run_id"]).info.status == "FINISHED"
        children = {c.info.run_name: c for c in tracker.children(summary["parent_run_id"])}
        assert sorted(children) == ["gamma adam lr=0.01", "gamma adam lr=0.05", "gamma adam lr=0.2"]
        assert {c.data.tags[PARENT_TAG] for c in children.values()} == {summary["parent_run_id"]}
        runs[mode] = children
    # the dask children were recorded by the cluster's worker processes, on this host
    assert {c.data.tags[HOST_TAG] for c in runs["dask"].values()} == {socket.gethostname()}
    assert str(os.getpid()) not in {c.data.tags[PID_TAG] for c in runs["dask"].values()}
    assert {c.data.tags[PID_TAG] for c in runs["threads"].values()} == {str(os.getpid())}
    for name, child in runs["dask"].items():
        twin = runs["threads"][name]
        assert child.info.status == twin.info.status == "FINISHED"
        for metric in ("nll", "steps", "aic", "heldout_nll", "estimate.concentration", "estimate.rate"):
            assert child.data.metrics[metric] == twin.data.metrics[metric], (name, metric)
        traces = [
            pd.read_parquet(tracker.client.download_artifacts(run.info.run_id, "trace.parquet", str(tmp_path / mode)))
            for mode, run in (("d", child), ("t", twin))
        ]
        pd.testing.assert_frame_equal(*(trace.drop(columns="time") for trace in traces))


def test_a_threads_sweep_of_many_configurations_into_sqlite_records_every_child(tracker):
    """More configurations than the flow's threads (and than MLflow's SQLite connection pool, 5 + 10):
    every child FINISHED, each its configuration's fit."""
    from nllflow.flows.sweep import THREADS, sweep

    rates = [round(0.005 * 1.1**i, 6) for i in range(40)]
    spec = parse_spec(sweep_spec("test-threads-many", lr=rates))
    assert len(spec.configurations()) > 2 * THREADS
    summary = sweep(spec)
    assert not summary["failed"]
    children = {c.info.run_name: c for c in tracker.children(summary["parent_run_id"])}
    assert sorted(children) == sorted(c.label() for c in spec.configurations())
    for configuration in spec.configurations():
        child = children[configuration.label()]
        assert child.info.status == "FINISHED"
        assert float(child.data.params["lr"]) == configuration.optimizer.lr
        assert len(tracker.client.get_metric_history(child.info.run_id, "nll")) == child.data.metrics["steps"] + 1
