"""PatchCast shared layer: what the edge node, the inference worker and the ``patchcast`` tools all use.

It is the bottom layer: it imports none of ``edge_node``, ``inference_worker`` or ``patchcast``.
It has two parts.

* The core: synchronous building blocks, importable and testable without a broker or an event loop
  (protocol, messages, codecs, topics, config, models, selection, gates, region, Prometheus
  rendering, …). No core module imports asyncio or one of the runtime modules below. Some core
  modules use threads or torch's thread pools internally (``shared.attention`` is thread-safe).
* Four runtime modules, each the one place for its kind of effect:

  - ``shared.transport``: the reconnecting MQTT v5 client identity, over ``shared.mqtt_client`` (one
    asyncio connection, also a runtime module) and the pure ``shared.mqtt_packets`` (the wire
    format), and the broker readiness probe;
  - ``shared.metrics_http``: the asyncio HTTP server for ``/metrics``;
  - ``shared.children``: starting and stopping supervised child processes;
  - ``shared.heap``: process-wide glibc malloc settings, applied once at the start of a process
    that runs models (the worker's ``run_worker``, ``patchcast eval``).

  ``shared.logs.configure`` is process-wide too; only a program's entry point calls it.

``lint-imports`` checks these rules (pyproject.toml ``[tool.importlinter]``; docs/architecture.md).
"""

__version__ = "0.1.0"
