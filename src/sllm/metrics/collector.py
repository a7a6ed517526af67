"""Gauges and totals read from the services' own state at scrape time.

Jobs by status and tokens/s come from the job store's rows; queue waits and trained tokens from
its durable counters (`sllm.jobs.counters`: they survive a restart and never decrease, though
jobs restart and their progress with them); CPUs/GPUs from the resource pool; instances and cold
starts from the deployment service.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from sllm.jobs.counters import QUEUE_WAIT_BOUNDS
from sllm.jobs.states import JobStatus
from sllm.metrics.requests import RequestMetrics

INSTANCE_STATES = ("starting", "ready", "stopping")


class ServicesCollector(Collector):
    """Reads the services `get_services()` returns (None before the server started: nothing)."""

    def __init__(self, get_services: Callable[[], Any]) -> None:
        self.get_services = get_services

    def collect(self) -> Iterator[Metric]:
        services = self.get_services()
        if services is None:
            return
        yield from _job_metrics(services.store)
        yield _resources(services.pool)
        if services.deployments is not None:
            yield from _serving(services.deployments)

    def describe(self) -> list[Metric]:
        return []  # dynamic: the registry must not call `collect` at registration


def _job_metrics(store) -> Iterator[Metric]:
    counts = store.count_by_status()
    jobs = GaugeMetricFamily(
        "sllm_fine_tuning_jobs", "Fine-tuning jobs by status.", labels=["status"]
    )
    for status in JobStatus:
        jobs.add_metric([status.value], counts.get(status.value, 0))
    yield jobs
    totals = store.metric_totals()  # monotonic, counted as the work happened
    waits = totals.queue_waits
    buckets = [(repr(b), c) for b, c in zip(QUEUE_WAIT_BOUNDS, waits.cumulative, strict=True)]
    yield HistogramMetricFamily(
        "sllm_fine_tuning_queue_wait_seconds",
        "Seconds each start of a job waited in the queue (since submission, re-queue or resume).",
        buckets=[*buckets, ("+Inf", waits.count)],
        sum_value=waits.total,
    )
    yield CounterMetricFamily(
        "sllm_fine_tuning_trained_tokens",
        "Loss tokens trained, re-trained tokens after a resume included; never decreases.",
        value=totals.trained_tokens,
    )
    speed = GaugeMetricFamily(
        "sllm_fine_tuning_tokens_per_second",
        "Training throughput of each running job.",
        labels=["job_id"],
    )
    for job_id, value in sorted(store.running_speeds().items()):
        speed.add_metric([job_id], value)
    yield speed


def _resources(pool) -> Metric:
    free_cpus, free_gpus = pool.free()
    gauge = GaugeMetricFamily(
        "sllm_resources",
        "CPU cores and GPUs of the pool shared by jobs and instances, free or held.",
        labels=["kind", "state"],
    )
    gauge.add_metric(["cpu", "free"], free_cpus)
    gauge.add_metric(["cpu", "held"], pool.total_cpus - free_cpus)
    gauge.add_metric(["gpu", "free"], len(free_gpus))
    gauge.add_metric(["gpu", "held"], pool.total_gpus - len(free_gpus))
    return gauge


def _serving(deployments) -> Iterator[Metric]:
    instances = GaugeMetricFamily(
        "sllm_instances", "Inference instances by model and state.", labels=["model", "state"]
    )
    for dep in deployments.status().data:
        states = [i.state for i in dep.instances]
        for state in sorted(set(INSTANCE_STATES) | set(states)):
            instances.add_metric([dep.model, state], states.count(state))
    yield instances
    cold = CounterMetricFamily(
        "sllm_cold_starts",
        "Instances started (cold starts), by model.",
        labels=["model"],
    )
    for model, n in sorted(getattr(deployments, "cold_starts", {}).items()):
        cold.add_metric([model], n)
    yield cold


def build_registry(get_services: Callable[[], Any]) -> tuple[CollectorRegistry, RequestMetrics]:
    """A registry of its own for one app: request metrics plus the services collector."""
    registry = CollectorRegistry(auto_describe=False)
    requests = RequestMetrics(registry)
    registry.register(ServicesCollector(get_services))
    return registry, requests
