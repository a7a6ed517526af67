"""A real Ray cluster on loopback for the whole session: a head (1 CPU, resource `head`) and a
worker node (2 CPUs, resource `node_b`). Test modules skip, saying why, when Ray is missing."""

from __future__ import annotations

import pytest
from cluster_helpers import LocalRayCluster


@pytest.fixture(scope="session")
def ray_cluster():
    cluster = LocalRayCluster()
    try:
        cluster.start_head(cpus=1)
        cluster.add_node("node_b", cpus=2)
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def cluster(ray_cluster):
    """The session cluster with both nodes up (a test that stopped `node_b` gets it back)."""
    if "node_b" not in ray_cluster.groups:
        ray_cluster.add_node("node_b", cpus=2)
    return ray_cluster
