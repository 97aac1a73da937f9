"""The live monitor: MQTT messages → aggregator → immutable snapshots → rich rendering.

* :mod:`~patchcast.monitor.state` — records, the aggregator and the snapshot (pure).
* :mod:`~patchcast.monitor.render` — snapshot → rich renderable (pure, 80×24).
* :mod:`~patchcast.monitor.ingest` — decoding wire messages into records.
* :mod:`~patchcast.monitor.app` — the MQTT session and the ``Live`` loop.
* :mod:`~patchcast.monitor.health` — availability checks for healthchecks.
"""
