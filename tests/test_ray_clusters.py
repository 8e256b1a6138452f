"""The test clusters of tests/ray_clusters.py when they fail to start: nothing is left behind.
Their working is tested where they are used (tests/test_orchestration.py: runs on every node and
logical GPU, `ray job submit`, the fake autoscaler adding GPU nodes, no process left after
close)."""

from __future__ import annotations

import os
import sys

import pytest

from tests import ray_clusters
from tests.ray_clusters import FixedCluster, processes_of

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="the clusters' process checks read /proc"
)


def test_a_cluster_that_does_not_come_up_in_time_is_ended(monkeypatch):
    made: list[str] = []
    original = ray_clusters.short_temp_dir

    def recorded() -> str:  # the failed constructor returns no object to ask for its temp dir
        made.append(original())
        return made[-1]

    monkeypatch.setattr(ray_clusters, "short_temp_dir", recorded)
    with pytest.raises(
        RuntimeError, match="the FixedCluster did not come up: no ready line within 1 s"
    ):
        FixedCluster(timeout=1)
    [temp_dir] = made
    assert processes_of(temp_dir) == [] and not os.path.exists(temp_dir)
