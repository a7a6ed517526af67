"""Capacity of a Ray cluster, node by node, behind the `ResourcePool` interface.

Ray cannot split one actor over two nodes, so a job of 2 CPUs does not fit two nodes of 1 CPU
each. The supervisor asks the pool whether a job fits *now*; answering from the cluster's sum
would move a job to `running` while Ray keeps its actor waiting for room. This pool therefore
answers per node: `try_acquire` picks a node with room (best fit: the node left with the fewest
idle GPUs, then CPUs) and the allocation names it, so the launcher pins the actor there and Ray
starts it at once. Node lists come from `ray.nodes()` (see `sllm.cluster.launcher`); nodes that
join add room on the next refresh, and nodes that leave take theirs away (allocations already on
them stay held until their holders end).

A node that leaves is remembered for `forget_after_s` (10 minutes) when judging whether a job
could *ever* fit: a GPU node that restarts, or a cluster that scales back up, should not turn
every pending GPU job into `unschedulable` in the meantime. Such jobs wait; after that long
without a node that could hold them they fail, as on one machine.

The pool is plain Python; it never imports Ray.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from sllm.jobs.resources import Allocation, AllocationLedger


@dataclass(frozen=True)
class NodeCapacity:
    node_id: str
    cpus: int
    gpus: int
    address: str = ""


class ClusterPool(AllocationLedger):
    def __init__(
        self, nodes: list[NodeCapacity] | None = None, *, forget_after_s: float = 600.0
    ) -> None:
        super().__init__()
        self.forget_after_s = forget_after_s
        self._nodes: dict[str, NodeCapacity] = {}
        self._gone: dict[str, tuple[NodeCapacity, float]] = {}  # node id -> (node, left at)
        self.set_nodes(nodes or [])

    # --- capacity -----------------------------------------------------------------------
    def set_nodes(self, nodes: list[NodeCapacity]) -> bool:
        """Replace the node list; True when the capacity changed."""
        new = {n.node_id: n for n in nodes}
        now = time.monotonic()
        with self._lock:
            changed = new != self._nodes
            for node_id, node in self._nodes.items():
                if node_id not in new:
                    self._gone[node_id] = (node, now)
            for node_id in new:
                self._gone.pop(node_id, None)
            self._nodes = new
        return changed

    def nodes(self) -> list[NodeCapacity]:
        with self._lock:
            return list(self._nodes.values())

    @property
    def total_cpus(self) -> int:
        with self._lock:
            return sum(n.cpus for n in self._nodes.values())

    @property
    def total_gpus(self) -> int:
        with self._lock:
            return sum(n.gpus for n in self._nodes.values())

    @property
    def gpu_ids(self) -> list[int]:
        return list(range(self.total_gpus))

    # --- the ResourcePool interface -----------------------------------------------------
    def fits_ever(self, cpus: int, gpus: int) -> bool:
        """True if one node could hold the request: a live one, or one that left recently."""
        horizon = time.monotonic() - self.forget_after_s
        with self._lock:
            recent = [n for n, left in self._gone.values() if left >= horizon]
            nodes = [*self._nodes.values(), *recent]
        return any(cpus <= n.cpus and gpus <= n.gpus for n in nodes)

    def free(self) -> tuple[int, list[int]]:
        """Free CPUs and a count of free GPUs (as ids 0..n-1), summed over live nodes."""
        with self._lock:
            room = [self._room_locked(n) for n in self._nodes.values()]
        return sum(c for c, _ in room), list(range(sum(len(g) for _, g in room)))

    def _place_locked(self, owner: str, cpus: int, gpus: int) -> Allocation | None:
        """The live node the request fits best (fewest GPUs, then CPUs, left over)."""
        best: tuple[tuple[int, int, int], NodeCapacity, list[int]] | None = None
        for order, node in enumerate(self._nodes.values()):
            free_cpus, free_gpus = self._room_locked(node)
            if cpus > free_cpus or gpus > len(free_gpus):
                continue
            key = (len(free_gpus) - gpus, free_cpus - cpus, order)
            if best is None or key < best[0]:
                best = (key, node, free_gpus)
        if best is None:
            return None
        _, node, free_gpus = best
        return Allocation(owner, cpus, tuple(free_gpus[:gpus]), node=node.node_id)

    def _room_locked(self, node: NodeCapacity) -> tuple[int, list[int]]:
        on_node = [a for a in self._held.values() if a.node == node.node_id]
        used_gpus = {g for a in on_node for g in a.gpu_ids}
        free_cpus = node.cpus - sum(a.cpus for a in on_node)
        return free_cpus, [g for g in range(node.gpus) if g not in used_gpus]
