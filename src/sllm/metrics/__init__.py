"""Prometheus metrics of one server (`GET /metrics`).

- `timing`: a per-request context the serving path marks at the first generated token (TTFT);
  no Prometheus import, so instances and workers never load it.
- `requests`: the ASGI middleware counting every HTTP request by route template and code, with
  duration and time-to-first-token histograms.
- `collector`: gauges and totals read at scrape time from the services' own state (job store,
  resource pool, deployments), so nothing is counted twice and a restart loses nothing the
  database keeps.

Each app gets its own `CollectorRegistry` (`build_registry`), never the process-global one: tests
and benchmarks run several apps in one process.
"""
