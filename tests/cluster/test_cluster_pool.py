"""The node-aware pool behind `--ray-address`: pure decisions, no Ray needed."""

from __future__ import annotations

from sllm.cluster.pool import ClusterPool, NodeCapacity

HEAD = NodeCapacity("head", cpus=1, gpus=0)
B = NodeCapacity("b", cpus=2, gpus=0)
GPU = NodeCapacity("gpu", cpus=4, gpus=2)


def test_a_job_must_fit_one_node_not_the_sum():
    pool = ClusterPool([HEAD, B])
    assert pool.total_cpus == 3
    assert pool.fits_ever(2, 0) and not pool.fits_ever(3, 0)
    assert pool.try_acquire("a", 2, 0).node == "b"
    # 1 CPU is free on the head, but no node has 2 free: the job stays pending
    assert pool.try_acquire("c", 2, 0) is None
    assert pool.try_acquire("d", 1, 0).node == "head"


def test_best_fit_keeps_big_holes_and_gpu_nodes_for_what_needs_them():
    pool = ClusterPool([GPU, B, HEAD])
    assert pool.try_acquire("cpu1", 1, 0).node == "head"  # the tightest fit
    assert pool.try_acquire("cpu2", 1, 0).node == "b"  # not the GPU node
    gpu = pool.try_acquire("g", 2, 1)
    assert gpu.node == "gpu" and gpu.gpu_ids == (0,)
    assert pool.try_acquire("g2", 1, 1).gpu_ids == (1,)  # never a GPU handed out twice
    assert pool.try_acquire("g3", 1, 1) is None
    pool.release("g")
    assert pool.try_acquire("g3", 1, 1).gpu_ids == (0,)


def test_acquire_is_idempotent_and_release_frees():
    pool = ClusterPool([B])
    first = pool.try_acquire("a", 2, 0)
    assert pool.try_acquire("a", 2, 0) is first
    assert pool.free() == (0, [])
    pool.release("a")
    assert pool.free() == (2, []) and pool.held() == {}


def test_capacity_follows_nodes_joining_and_leaving():
    pool = ClusterPool([HEAD], forget_after_s=0)
    assert not pool.fits_ever(2, 0)
    assert pool.set_nodes([HEAD, B]) is True
    assert pool.set_nodes([HEAD, B]) is False  # no change, no wake-up
    held = pool.try_acquire("a", 2, 0)
    assert held.node == "b"
    pool.set_nodes([HEAD])  # b left: its room is gone, its holder stays held until it ends
    assert pool.total_cpus == 1 and "a" in pool.held()
    assert pool.try_acquire("c", 1, 0).node == "head"
    assert pool.try_acquire("d", 1, 0) is None
    assert not pool.fits_ever(2, 0)  # forgotten at once here


def test_a_node_that_left_recently_still_counts_for_what_could_ever_fit():
    pool = ClusterPool([HEAD, GPU])
    pool.set_nodes([HEAD])  # the GPU node restarts
    assert pool.fits_ever(2, 1)  # pending GPU jobs wait for it instead of failing
    assert pool.try_acquire("g", 1, 1) is None and pool.total_gpus == 0
    pool.set_nodes([HEAD, NodeCapacity("gpu-again", cpus=4, gpus=2)])
    assert pool.try_acquire("g", 1, 1).node == "gpu-again"


def test_allocations_name_their_node_in_the_job_record():
    alloc = ClusterPool([B]).try_acquire("a", 1, 0)
    assert alloc.as_dict() == {"cpus": 1, "gpu_ids": [], "node": "b"}
