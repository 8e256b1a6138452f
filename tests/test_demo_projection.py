"""bench/demo_projection.py: the runs' own timers, placed longest first onto the cores
(hand-counted)."""

from __future__ import annotations

import pytest

from bench.demo_projection import main
from bench.scheduling import makespan
from models.catalog import NETWORK_COST
from orchestrator.paths import WorkPaths
from orchestrator.tracking.records import RunRecords


def test_longest_first_onto_the_free_worker():
    assert (
        makespan([5, 4, 3, 3, 3], 2) == 10
    )  # 5 | 4, then 3 onto 4 (7), 3 onto 5 (8), 3 onto 7 (10)
    assert makespan([5, 4, 3, 3, 3], 3) == 7  # 5 | 4, 3 | 3, 3
    assert makespan([1.5] * 15, 16) == 1.5
    with pytest.raises(ValueError, match="expected at least 1"):
        makespan([1.0], 0)


def test_the_projection_reads_each_runs_timers(tmp_path, capsys):
    paths = WorkPaths(tmp_path)
    for fold in (1, 2):
        for i, network in enumerate(
            NETWORK_COST
        ):  # runs of 10, 20, 30 s of timers, + 5 s around each
            run = paths.run(fold, network)
            run.root.mkdir(parents=True)
            RunRecords(run).write_timing({"steps": 10.0 * (i + 1) - 1, "tracing": 1.0})
    main(["--workdir", str(tmp_path), "--folds", "2", "--cores", "1,2,6", "--overhead", "5"])
    out = capsys.readouterr().out
    assert "6 runs, 150 core-seconds" in out
    assert "  1 cores: training stage about 150 s" in out
    assert "  2 cores: training stage about 75 s" in out  # 35+25+15 | 35+25+15
    assert "  6 cores: training stage about 35 s" in out


def test_a_run_without_timers_is_named(tmp_path):
    with pytest.raises(SystemExit, match="timing.json: expected a finished run's timers"):
        main(["--workdir", str(tmp_path), "--folds", "1"])


def test_the_grid_launches_the_runs_longest_expected_first(tmp_path):
    """Expected time: the network's cost per image and epoch times the run's epochs. In the demo
    resnet50v2 trains twice the epochs of xception, and must not start last; runs of one network
    go one after another (a process that trains several traces each network once)."""
    from orchestrator.cluster.grid import pending_runs
    from orchestrator.config import load_config, resolved
    from orchestrator.training.job import RunJob

    config = resolved(load_config("configs/demo.yaml", [f"workdir={tmp_path}"]))
    jobs = [RunJob.of(config, fold, n) for fold in (1, 2) for n in NETWORK_COST]
    order = [(job.network, job.epochs) for job in pending_runs(jobs)]
    expected = [NETWORK_COST[n] * epochs for n, epochs in order]
    assert expected == sorted(expected, reverse=True) and len(order) == 6
    assert order[-2:] == [("xception", 8), ("xception", 8)], order
    networks = [network for network, _ in order]
    assert networks == sorted(networks, key=networks.index)  # each network's runs together
    RunRecords(RunJob.of(config, 1, "concatenated").paths).write_done("id", "fp", "")
    assert len(pending_runs(jobs)) == 5  # a finished run is not launched again
