"""Autoscaling of the worker pool.

* :mod:`~patchcast.scaling.policy` — the decision (pure; one implementation for every backend).
* :mod:`~patchcast.scaling.backends` — supervised subprocesses, docker compose, observe-only.
* :mod:`~patchcast.scaling.service` — metrics in, decisions out, Prometheus ``/metrics``.
(Prometheus text exposition and the HTTP endpoint: :mod:`shared.prometheus` and :mod:`shared.metrics_http`,
shared with the worker.)
"""
