"""Autoscaling of the worker pool.

* :mod:`~patchcast.scaling.policy` — the decision (pure; one implementation for every backend).
* :mod:`~patchcast.scaling.backends` — supervised subprocesses, docker compose, observe-only.
* :mod:`~patchcast.scaling.service` — metrics in, decisions out, Prometheus ``/metrics``.
* :mod:`~patchcast.scaling.prometheus` — text exposition and the HTTP endpoint.
"""
