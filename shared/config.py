"""One typed, closed configuration schema.

Sources, later wins: the dataclass defaults → a TOML (or YAML) file → environment variables
``PATCHCAST_<SECTION>__<FIELD>`` (e.g. ``PATCHCAST_BROKER__PORT=1884``) → explicit overrides
(CLI flags). Unknown sections or keys are rejected with a suggestion, values are type-checked,
and every field carries a description (``patchcast config --describe`` prints them).

Each component takes only its own section (``cfg.worker``, ``cfg.batching`` …).
"""

from __future__ import annotations

import copy
import difflib
import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from shared.errors import ConfigError

ENV_PREFIX = "PATCHCAST_"


def _f(default: Any, help: str) -> Any:
    """A field with a default and a description (shown by ``--describe``)."""
    if isinstance(default, list | dict | set):
        # a fresh copy per instance: one mutable default object must never be shared by every config
        return field(default_factory=lambda: copy.deepcopy(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class BrokerConfig:
    host: str = _f("127.0.0.1", "MQTT broker host name or address")
    port: int = _f(1883, "MQTT broker TCP port")
    username: str = _f("", "user name (empty: anonymous); the password comes from PATCHCAST_BROKER__PASSWORD")
    password: str = _f("", "password; prefer the environment variable over the file")
    keepalive_s: int = _f(30, "MQTT keep-alive interval in seconds")
    connect_timeout_s: float = _f(10.0, "seconds to wait for the broker's CONNACK")
    publish_timeout_s: float = _f(10.0, "seconds to wait for one publish/subscribe call to complete")
    max_packet_bytes: int = _f(1_048_576, "largest MQTT packet; must match the broker's max_packet_size")
    reconnect_min_s: float = _f(0.5, "first reconnect delay; doubles per failure with jitter")
    reconnect_max_s: float = _f(2.0, "largest reconnect delay (bounds how long a client stays away after the broker "
                                     "is back; docs/reliability.md)")
    tls: bool = _f(False, "connect over TLS (the broker's TLS listener, usually port 8883); the broker's "
                   "certificate is always verified")
    tls_ca_file: str = _f("", "PEM file of the CA(s) that signed the broker's certificate (empty: the system's "
                          "trusted CAs)")
    tls_cert_file: str = _f("", "mutual TLS: this client's certificate (PEM), for a listener with "
                            "require_certificate true (empty: none)")
    tls_key_file: str = _f("", "mutual TLS: the private key (PEM) of tls_cert_file (empty: the key is inside "
                           "tls_cert_file)")
    tls_verify_hostname: bool = _f(True, "check that the broker's certificate names broker.host; turn off only "
                                   "when the certificate cannot name the address clients use (the chain is "
                                   "still verified)")

    def __post_init__(self) -> None:
        _check(0 < self.port < 65536, "broker.port must be in 1..65535")
        _check(self.tls or not (self.tls_ca_file or self.tls_cert_file or self.tls_key_file),
               "broker.tls_ca_file/tls_cert_file/tls_key_file need broker.tls = true")
        _check(bool(self.tls_cert_file) or not self.tls_key_file, "broker.tls_key_file needs broker.tls_cert_file")
        _check(self.max_packet_bytes >= 1024, "broker.max_packet_bytes must be ≥ 1024")
        _check(0 < self.reconnect_min_s <= self.reconnect_max_s, "broker reconnect delays must be 0 < min ≤ max")
        _check(self.connect_timeout_s > 0 and self.publish_timeout_s > 0, "broker timeouts must be positive")


@dataclass(frozen=True)
class ModelsConfig:
    edge: str = _f("zoo:cifar10-edge", "edge model: zoo:NAME, timm:NAME or file:PATH.safetensors")
    server: str = _f("zoo:cifar10-server", "server model: zoo:NAME, timm:NAME or file:PATH.safetensors")
    pretrained: bool = _f(False, "for timm: names, load the official pretrained weights (needs network or cache)")
    model_id: str = _f("", "model name in request topics (default: derived from the server model)")


@dataclass(frozen=True)
class SelectionConfig:
    rule: Literal["topk", "threshold", "sum_threshold", "random_k"] = _f(
        "sum_threshold", "patch selection rule")
    value: float = _f(0.97, "k for topk/random_k, δ for threshold, δ_sum for sum_threshold")
    score: Literal["attention", "rollout"] = _f("attention", "patch score: last-layer CLS attention or rollout")
    offer_rule: Literal["topk", "threshold", "sum_threshold", "all"] = _f(
        "topk", "edge.offload = 'top_up': the larger selection a device offers beside the patches it sends (with "
                "them, on the same scores; all: every patch); a worker unsure on the sent ones asks for the rest")
    offer_value: float = _f(75, "k, δ or δ_sum of offer_rule (k beyond the grid: every patch)")
    spread: int = _f(0, "which patches the rule's count keeps: 0, the highest-scoring (the paper's); c ≥ 2, spread "
                        "over c×c cells of the grid (the best of every cell first, then the second best, ...); "
                        "for the offer too. On Imagenette 2 beats random and the paper's order at few patches, not at "
                        "most (docs/results.md)")

    def __post_init__(self) -> None:
        _check(self.offer_value > 0, "selection.offer_value must be > 0")
        _check(self.spread >= 0, "selection.spread must be ≥ 0 (a cell side in patches; 0: by score)")


@dataclass(frozen=True)
class GateConfig:
    kind: Literal["min_entropy", "shannon", "margin"] = _f("min_entropy", "uncertainty measure of the edge logits")
    threshold: float = _f(0.8, "η: send when uncertainty ≥ η (margin: when top-2 margin ≤ threshold)")


@dataclass(frozen=True)
class CodecConfig:
    name: str = _f("jpeg-mosaic", "patch codec (see 'patchcast codecs'; jpeg-mosaic: the smallest JPEG, "
                   "docs/benchmarks.md)")
    quality: int = _f(90, "quality for lossy codecs (1..100)")

    def __post_init__(self) -> None:
        _check(1 <= self.quality <= 100, "codec.quality must be in 1..100")


@dataclass(frozen=True)
class EdgeConfig:
    source: str = _f("cifar10/test.tar", "images: folder, ImageFolder tree, tar of one, or labels.csv folder")
    devices: int = _f(1, "simulated devices (each its own MQTT client and reply topic)")
    rate_hz: float = _f(2.0, "images per second per device (0: as fast as replies allow)")
    max_in_flight: int = _f(4, "requests awaiting a reply per device")
    reply_timeout_s: float = _f(2.0, "seconds one attempt waits for its reply before the device re-sends the request "
                                "(same request id; see edge.retries and edge.deadline_s)")
    retries: int = _f(2, "re-sends of an unanswered request (after a reply timeout or a 'busy' refusal), under the "
                         "same request id, with jittered exponential backoff; a publish that fails because the broker "
                         "is away is tried again without counting (docs/reliability.md)")
    deadline_s: float = _f(0.0, "an image's deadline: seconds from its first publish after which the device stops "
                                "waiting and keeps the edge label (0: (retries + 1) × reply_timeout_s, so every retry "
                                "can still be answered in time); it travels in the request")
    retry_backoff_s: float = _f(0.1, "delay before the first re-send; doubles per re-send, times a random factor in "
                                     "[0.5, 1] so that devices do not re-send in step")
    limit: int = _f(0, "images per device, each from its own offset (0: the whole source per device, so N devices "
                       "make N passes; looping when --duration is set)")
    device_prefix: str = _f("cam", "device id prefix; ids are PREFIX-0000, PREFIX-0001, …")
    credentials_file: str = _f("", "file of 'DEVICE-ID PASSWORD' lines (patchcast broker add-device "
                               "--credentials-out): each simulated device logs in as its own id (production profile); "
                               "empty: every device uses broker.username/password")
    threads: int = _f(1, "torch threads for the shared edge model")
    batch_size: int = _f(8, "edge images run through the model together (amortises the forward)")
    duration_s: float = _f(0.0, "seconds to run the fleet (0: until every device has sent its images)")
    batch_delay_ms: float = _f(5.0, "longest wait for more devices' images before an edge batch runs")
    publish_outcomes: bool = _f(True, "publish an Outcome message per image on the device's metrics topic")
    measure_full_bytes: bool = _f(True, "also encode each sent image as a full-image JPEG (one extra encode) so "
                                  "outcomes report the bytes patch selection saved")
    metrics_interval_s: float = _f(5.0, "seconds between a device's EdgeMetrics messages")
    busy_retry_delay_s: float = _f(0.2, "wait before re-sending after a 'busy' reply (counts as a retry)")
    offload: Literal["patches", "region", "top_up"] = _f(
        "patches", "what a device sends when its gate says so: patches, the attention-chosen patches (the paper's "
                   "method); region, the whole image downsampled, then the full-resolution region the worker asks "
                   "for (see [region]); top_up, the attention-chosen patches with an offer of more "
                   "(selection.offer_rule), which a worker unsure on the first asks for (region.top_up_threshold)")
    connect_concurrency: int = _f(64, "devices of a fleet connecting at once; each waits broker.connect_timeout_s "
                                      "from its own start, and one that never connects is counted, not waited for")
    processes: int = _f(0, "fleet processes that split edge.devices (0: as few as the file-descriptor limit allows, "
                           "one socket per device)")
    device_offset: int = _f(0, "index of this process's first device id (a multi-process fleet sets it per child)")
    random_phase: bool = _f(False, "each device sends its first image at a random point of its first interval "
                                   "(1 / rate_hz), so a large fleet with a low per-device rate spreads its load")
    shutdown_timeout_s: float = _f(5.0, "seconds a stopping fleet spends ending its run: half for the images in "
                                        "flight to settle (the rest are counted as abandoned), a quarter for the "
                                        "devices' farewells (offline availability); then every connection closes at "
                                        "once (without a farewell the broker publishes the device's will); SIGTERM to "
                                        "exit stays within a few seconds")

    def __post_init__(self) -> None:
        _check(self.devices >= 1, "edge.devices must be ≥ 1")
        _check(self.rate_hz >= 0, "edge.rate_hz must be ≥ 0")
        _check(self.max_in_flight >= 1, "edge.max_in_flight must be ≥ 1")
        _check(self.reply_timeout_s > 0, "edge.reply_timeout_s must be positive")
        _check(self.retries >= 0 and self.limit >= 0, "edge.retries and edge.limit must be ≥ 0")
        _check(self.batch_size >= 1, "edge.batch_size must be ≥ 1")
        _check(self.duration_s >= 0 and self.batch_delay_ms >= 0,
               "edge.duration_s and edge.batch_delay_ms must be ≥ 0")
        _check(self.metrics_interval_s > 0, "edge.metrics_interval_s must be positive")
        _check(self.busy_retry_delay_s >= 0, "edge.busy_retry_delay_s must be ≥ 0")
        _check(self.deadline_s >= 0 and self.retry_backoff_s >= 0,
               "edge.deadline_s and edge.retry_backoff_s must be ≥ 0")
        _check(self.connect_concurrency >= 1, "edge.connect_concurrency must be ≥ 1")
        _check(self.processes >= 0 and self.device_offset >= 0, "edge.processes and edge.device_offset must be ≥ 0")
        _check(self.shutdown_timeout_s > 0, "edge.shutdown_timeout_s must be positive")
        _check(self.deadline_s == 0 or self.retries == 0 or self.deadline_s > self.reply_timeout_s,
               "edge.deadline_s must exceed edge.reply_timeout_s when edge.retries > 0: a re-send must have time "
               "to be answered before the deadline")

    @property
    def image_deadline_s(self) -> float:
        """``deadline_s`` resolved: 0 means (retries + 1) × reply_timeout_s."""
        return self.deadline_s or (self.retries + 1) * self.reply_timeout_s


@dataclass(frozen=True)
class BatchingConfig:
    max_batch: int = _f(32, "a batch closes at this many requests …")
    max_tokens: int = _f(2048, "… or this many tokens (CLS included) … (2048 beat 1024 and 4096 on DeiT-Base, "
                         "docs/benchmarks.md)")
    max_delay_ms: float = _f(10.0, "… or this long after its first request, whichever comes first")
    policy: Literal["packed", "padded", "sequential"] = _f(
        "packed", "packed: all tokens in one sequence, attention per sample; padded: pad + key-padding mask")
    attention: Literal["auto", "sdpa", "padded", "varlen"] = _f(
        "auto", "packed policy: attention per sample on its own slice (sdpa), one masked call over a padded copy "
        "of Q/K/V (padded), or one flash-attention call over the packed rows (varlen: CUDA with bf16 only); auto: "
        "sdpa on the CPU; on CUDA varlen where torch has it, else padded; see docs/benchmarks.md")
    cls_only_last: bool = _f(True, "packed policy: the last block computes only the CLS rows (its other outputs "
                             "are never read)")
    shape_buckets: bool = _f(True, "packed policy: round a batch's token count up to one of ~16 sizes per doubling "
                             "(≤ 6.25 % dummy rows) so oneDNN reuses its per-shape kernels instead of building "
                             "new ones for almost every batch; see docs/benchmarks.md")

    def __post_init__(self) -> None:
        _check(self.max_batch >= 1 and self.max_tokens >= 2, "batching limits must be positive")
        _check(self.max_delay_ms >= 0, "batching.max_delay_ms must be ≥ 0")


@dataclass(frozen=True)
class WorkerConfig:
    group: str = _f("workers", "shared-subscription group: workers of one group split the requests")
    worker_id: str = _f("", "worker id (default: host name + pid)")
    queue_capacity: int = _f(256, "bounded request queue; beyond it devices get a 'busy' error reply")
    admission: bool = _f(True, "refuse at once ('busy') a request whose deadline the queue ahead of it cannot meet, "
                               "judged by a running estimate of batch time (docs/service.md)")
    threads: int = _f(1, "torch threads for inference (0: all cores). 1 by default: a pool scales out with worker "
                         "processes, and a worker whose threads share cores with other busy processes waits at every "
                         "parallel region (2 threads on a busy 2-core host: 1 s a batch instead of 5 ms, "
                         "docs/service.md)")
    precision: Literal["auto", "bf16", "fp32"] = _f("auto", "auto: bf16 where a start-up probe measures it "
                                                                 "≥ 1.25× faster than fp32 on this CPU")
    device: str = _f("cpu", "where the server model runs: cpu, cuda or cuda:N (a worker process per GPU); with "
                             "CUDA, precision auto means bf16")
    prepack_weights: bool = _f(True, "bf16: keep the blocks' Linear weights in oneDNN's blocked layout instead of "
                                     "re-laying them out at every product (faster, most for small batches; "
                                     "skipped where this torch lacks the ops); see docs/benchmarks.md")
    engine_process: Literal["auto", "on", "off"] = _f(
        "auto", "run the server model in a child process of the worker, away from its event loop's GIL "
                "(auto: on for CUDA, where the forward is many small launches; off for a CPU); docs/service.md")
    metrics_interval_s: float = _f(1.0, "seconds between metrics messages")
    shutdown_grace_s: float = _f(10.0, "on SIGTERM, seconds to finish and answer what is queued")
    metrics_port: int = _f(0, "Prometheus /metrics HTTP port (0: off)")
    decode_threads: int | Literal["auto"] = _f(
        "auto", "threads decoding patch payloads to pixels, off the event loop; 0: none, each request's pixels "
                "decode on the inference thread as its batch is assembled (no hand-off: the least CPU per "
                "request where the model shares a core with the rest); auto: 0 for a CPU worker, 1 for CUDA, "
                "where a thread decodes while the GPU computes (docs/benchmarks.md)")
    frontends: int = _f(1, "worker processes (each its own MQTT client and event loop) sharing one engine process that "
                           "runs their waiting batches as one forward (a GPU then sees one large batch); > 1 needs the "
                           "engine process; docs/service.md")
    decode_processes: int = _f(0, "decode in this many child processes instead (0: in decode_threads threads): a "
                                  "decoder thread waits for the GIL while the event loop is busy, which limited a GPU "
                                  "worker to ~650 requests/s (docs/service.md)")
    retain_heap: bool = _f(True, "keep freed tensor memory in the process (glibc mallopt) instead of page-faulting "
                                 "every batch's activations in again: 1.4× packed bf16 DeiT-Base on an AMX Xeon")
    max_publish_in_flight: int = _f(20, "replies awaiting the broker's PUBACK at once (never more than the "
                                    "broker's Receive Maximum)")
    dedupe_capacity: int = _f(4096, "recent (device, request id) pairs remembered, so a device's re-send of a request "
                                    "already answered gets the same reply again without a second inference, and one "
                                    "still in progress is not computed twice (0: off; docs/reliability.md)")
    dedupe_ttl_s: float = _f(60.0, "seconds a remembered reply is kept for re-sends (longer than a device's deadline)")

    def __post_init__(self) -> None:
        _check(self.queue_capacity >= 1, "worker.queue_capacity must be ≥ 1")
        _check(self.metrics_interval_s > 0, "worker.metrics_interval_s must be positive")
        _check(self.threads >= 0 and self.decoder_threads >= 0 and self.decode_processes >= 0,
               "worker.threads, worker.decode_threads and worker.decode_processes must be ≥ 0")
        _check(self.shutdown_grace_s >= 0, "worker.shutdown_grace_s must be ≥ 0")
        _check(0 <= self.metrics_port < 65536, "worker.metrics_port must be in 0..65535")
        _check(1 <= self.max_publish_in_flight <= 65_535, "worker.max_publish_in_flight must be in 1..65535")
        _check(self.dedupe_capacity >= 0 and self.dedupe_ttl_s > 0,
               "worker.dedupe_capacity must be ≥ 0 and worker.dedupe_ttl_s positive")
        _check(re.fullmatch(r"cpu|cuda(:\d+)?", self.device) is not None,
               f"worker.device must be cpu, cuda or cuda:N, got {self.device!r}")
        _check(self.frontends >= 1, "worker.frontends must be ≥ 1")
        _check(self.frontends == 1 or self.uses_engine_process,
               "worker.frontends > 1 shares an engine process: set worker.engine_process = 'on' (or a CUDA device)")

    @property
    def decoder_threads(self) -> int:
        """``decode_threads`` resolved: ``auto`` is 0 (decode on the inference thread) for a CPU, 1 for CUDA."""
        if self.decode_threads == "auto":
            return 0 if self.device == "cpu" else 1
        return self.decode_threads

    @property
    def uses_engine_process(self) -> bool:
        """``engine_process`` resolved: ``auto`` is on for CUDA only."""
        return self.engine_process == "on" or (self.engine_process == "auto" and self.device != "cpu")


@dataclass(frozen=True)
class RoutingConfig:
    experts: str = _f("", "expert routing: 'MODEL_ID=C,C,…; MODEL_ID=…' (global class ids each specialist was trained "
                      "on, e.g. from 'patchcast train --classes'); a sent image goes to the expert holding the most "
                      "of the edge's top-k probability mass, else to models.model_id. Empty: no routing")
    top_k: int = _f(5, "edge classes whose probability mass routing weighs (at most the 5 a request carries)")
    min_share: float = _f(0.0, "route to an expert only when it holds at least this share of the top-k mass, else "
                          "to models.model_id (0: always the best expert; see docs/results.md for measured values)")

    def __post_init__(self) -> None:
        from shared.routing import parse_experts

        _check(1 <= self.top_k <= 5, "routing.top_k must be in 1..5")
        _check(0.0 <= self.min_share <= 1.0, "routing.min_share must be in [0, 1]")
        parse_experts(self.experts)  # raises ConfigError on a malformed table


@dataclass(frozen=True)
class RegionConfig:
    downscale: int = _f(2, "devices with edge.offload = 'region' send the whole image box-downsampled by this factor "
                           "(it must divide the model's patch size); the worker upsamples it back")
    side: float = _f(0.5, "the window the worker asks for: this fraction of the image side (0.5: a quarter of the "
                          "patches), placed where the server's own attention on the glance sums highest")
    placement: Literal["attention", "centre"] = _f(
        "attention", "where the window goes: attention, where the server's own last-block CLS attention on the glance "
                     "sums highest; centre, the middle of the image (on object-centred images such as CIFAR-10 it "
                     "measured 0.2–0.9 points better, docs/results.md)")
    threshold: float = _f(0.4, "the worker asks for a region when the glance's min-entropy (bits) is at least this; "
                               "higher answers more images from the glance alone (0.4 measured best on the zoo's "
                               "glance server, docs/results.md)")
    fusion: Literal["image", "probs", "image+probs"] = _f(
        "image", "how the region is used: image, the glance's upsampled pixels with the window's full-resolution "
                 "patches in place, one forward; probs, the window's patches alone, averaged with the glance's "
                 "probabilities; image+probs, the first averaged with the glance")
    top_up_threshold: float = _f(
        1.07, "the worker asks a device that offers more patches (edge.offload = 'top_up') for them when its "
              "min-entropy (bits) on the sent patches is at least this, and answers on all of them (1.07 with "
              "top-38 sent and top-75 offered at gate η 0.565: docs/results.md)")
    max_pending: int = _f(1024, "exchanges one worker holds at once; beyond it the glance answers alone (counted)")
    timeout_s: float = _f(5.0, "how long a worker keeps an exchange waiting for its region")

    def __post_init__(self) -> None:
        _check(2 <= self.downscale <= 16, "region.downscale must be in 2..16")
        _check(0.0 < self.side <= 1.0, "region.side must be in (0, 1]")
        _check(self.threshold >= 0.0, "region.threshold must be ≥ 0")
        _check(self.top_up_threshold >= 0.0, "region.top_up_threshold must be ≥ 0")
        _check(self.max_pending >= 1 and self.timeout_s > 0, "region.max_pending ≥ 1 and region.timeout_s > 0")


@dataclass(frozen=True)
class LoggingConfig:
    format: Literal["auto", "json", "console"] = _f("auto", "auto: console on a terminal, JSON lines otherwise")
    level: Literal["debug", "info", "warning", "error"] = _f("info", "minimum log level")


@dataclass(frozen=True)
class MonitorConfig:
    refresh_s: float = _f(1.0, "seconds between dashboard refreshes (one immutable snapshot each)")
    window_s: float = _f(30.0, "sliding window for rates, fractions and latency percentiles")
    sparkline_points: int = _f(40, "latency p95 history points kept for the sparkline (one per refresh)")
    worker_stale_s: float = _f(5.0, "a worker silent this long is shown stale and left out of totals")
    sys_topics: bool = _f(True, "subscribe to the broker's $SYS/# statistics (clients, message rates)")

    def __post_init__(self) -> None:
        _check(self.refresh_s > 0 and self.window_s > 0, "monitor refresh_s and window_s must be positive")
        _check(self.sparkline_points >= 2, "monitor.sparkline_points must be ≥ 2")
        _check(self.worker_stale_s > 0, "monitor.worker_stale_s must be positive")


@dataclass(frozen=True)
class ScalerConfig:
    min_workers: int = _f(1, "smallest pool size (also the size at start)")
    max_workers: int = _f(4, "largest pool size")
    backend: Literal["process", "compose", "observe"] = _f(
        "process", "process: supervise 'patchcast worker' subprocesses; compose: docker compose --scale; "
        "observe: only compute and export the desired size (Kubernetes/KEDA scale on it)")
    interval_s: float = _f(1.0, "seconds between scaling decisions")
    queue_per_worker_high: float = _f(8.0, "scale up when the mean queue depth per worker exceeds this …")
    queue_age_high_ms: float = _f(400.0, "… or the oldest queued request is older than this (or, with "
                                  "use_arrival_lateness, the p95 wait in the broker) …")
    busy_high: float = _f(0.85, "… or the mean busy fraction exceeds this")
    queue_per_worker_low: float = _f(1.0, "scale down only when the queue depth per worker is below this …")
    busy_low: float = _f(0.35, "… and the busy fraction (rescaled to one worker fewer) is below this")
    up_after_s: float = _f(2.0, "a scale-up condition must hold this long before acting (hysteresis)")
    down_after_s: float = _f(8.0, "a scale-down condition must hold this long before acting (hysteresis)")
    up_cooldown_s: float = _f(4.0, "after any change, no scale-up for this long (new workers warm up)")
    down_cooldown_s: float = _f(15.0, "after any change, no scale-down for this long (prevents flapping)")
    max_step_up: int = _f(2, "most workers added by one decision (backlog-proportional below that)")
    metrics_stale_s: float = _f(5.0, "worker metrics older than this are ignored")
    use_arrival_lateness: bool = _f(True, "count the p95 time requests wait in the broker before a worker sees "
                                    "them (device sent_at → receipt) as queue age; needs device and worker "
                                    "clocks in sync (NTP): turn off where they are not")
    latency_target_ms: float = _f(1000.0, "end-to-end p95 the pool is sized for (reported as the SLO)")
    drain_timeout_s: float = _f(15.0, "stopping a worker: SIGTERM, wait this long to drain, then SIGKILL")
    restart_max: int = _f(5, "crashed workers are restarted at most this many times …")
    restart_window_s: float = _f(60.0, "… within this many seconds; beyond that the slot waits")
    restart_backoff_s: float = _f(1.0, "delay before restarting a crashed worker (doubles per recent crash)")
    startup_grace_s: float = _f(60.0, "a new worker is 'starting' until its first metrics or this long")
    metrics_host: str = _f("127.0.0.1", "address of the scaler's Prometheus /metrics endpoint")
    metrics_port: int = _f(9464, "port of the scaler's Prometheus /metrics endpoint (0: off)")
    compose_file: str = _f("compose.yaml", "compose backend: the compose file")
    compose_service: str = _f("worker", "compose backend: the service to scale")
    compose_project: str = _f("", "compose backend: project name (empty: compose's default)")

    def __post_init__(self) -> None:
        _check(1 <= self.min_workers <= self.max_workers, "scaler needs 1 ≤ min_workers ≤ max_workers")
        _check(self.interval_s > 0, "scaler.interval_s must be positive")
        _check(0 <= self.busy_low < self.busy_high <= 1.0, "scaler needs 0 ≤ busy_low < busy_high ≤ 1")
        _check(0 <= self.queue_per_worker_low < self.queue_per_worker_high,
               "scaler needs 0 ≤ queue_per_worker_low < queue_per_worker_high")
        _check(self.max_step_up >= 1, "scaler.max_step_up must be ≥ 1")
        _check(self.drain_timeout_s > 0, "scaler.drain_timeout_s must be positive")
        _check(self.restart_max >= 0 and self.restart_window_s > 0, "scaler restart limits must be ≥ 0")
        _check(0 <= self.metrics_port < 65536, "scaler.metrics_port must be in 0..65535")


@dataclass(frozen=True)
class DemoConfig:
    profile: Literal["imagenette", "cifar10", "deit"] = _f(
        "imagenette", "imagenette: offline zoo models + Imagenette val photos; cifar10: offline zoo models + "
        "CIFAR-10 test set; deit: timm DeiT-Tiny/Base + a folder")
    devices: int = _f(8, "simulated devices")
    rate_hz: float = _f(2.0, "images per second per device")
    duration_s: float = _f(30.0, "seconds the devices send images")
    deit_source: str = _f("imagenette2/val.tar", "images for the deit profile (under $PATCHCAST_DATA)")
    startup_timeout_s: float = _f(180.0, "seconds to wait for the broker and the first worker")
    settle_s: float = _f(3.0, "seconds after the devices stop for the last outcomes to arrive")
    shutdown_timeout_s: float = _f(20.0, "bound on stopping each child process (then it is killed)")

    def __post_init__(self) -> None:
        _check(self.devices >= 1, "demo.devices must be ≥ 1")
        _check(self.rate_hz >= 0 and self.duration_s > 0, "demo needs rate_hz ≥ 0 and duration_s > 0")
        _check(self.startup_timeout_s > 0 and self.shutdown_timeout_s > 0, "demo timeouts must be positive")


@dataclass(frozen=True)
class Config:
    broker: BrokerConfig = field(default_factory=BrokerConfig, metadata={"help": "MQTT broker connection"})
    models: ModelsConfig = field(default_factory=ModelsConfig, metadata={"help": "edge and server models"})
    selection: SelectionConfig = field(default_factory=SelectionConfig, metadata={"help": "patch selection"})
    gate: GateConfig = field(default_factory=GateConfig, metadata={"help": "entropy-aware transmission"})
    codec: CodecConfig = field(default_factory=CodecConfig, metadata={"help": "patch encoding on the wire"})
    edge: EdgeConfig = field(default_factory=EdgeConfig, metadata={"help": "edge devices / fleet simulator"})
    batching: BatchingConfig = field(default_factory=BatchingConfig, metadata={"help": "worker dynamic batching"})
    worker: WorkerConfig = field(default_factory=WorkerConfig, metadata={"help": "inference worker"})
    routing: RoutingConfig = field(default_factory=RoutingConfig, metadata={"help": "expert routing (edge)"})
    region: RegionConfig = field(default_factory=RegionConfig,
                                 metadata={"help": "server-driven region retransmission (edge and worker)"})
    logging: LoggingConfig = field(default_factory=LoggingConfig, metadata={"help": "structured logs"})
    monitor: MonitorConfig = field(default_factory=MonitorConfig, metadata={"help": "live dashboard"})
    scaler: ScalerConfig = field(default_factory=ScalerConfig, metadata={"help": "worker pool autoscaler"})
    demo: DemoConfig = field(default_factory=DemoConfig, metadata={"help": "the one-command demo"})


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check (and, for env strings, parse) one value against a field's type."""
    origin = get_origin(tp)
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, choices))}")
        return value
    if origin in (types.UnionType, typing.Union):
        errors = []
        for arg in get_args(tp):
            if arg is type(None) and value is None:
                return None
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(exc.message)
        raise ConfigError("; ".join(errors))
    if tp is bool:
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError as exc:
                raise ConfigError(f"{where}: expected an integer, got {value!r}") from exc
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError as exc:
                raise ConfigError(f"{where}: expected a number, got {value!r}") from exc
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported field type {tp!r}")


def _apply(obj: Any, data: Mapping[str, Any], where: str) -> Any:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where or 'config'}: expected a table, got {type(data).__name__}")
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in fields(obj)}
    changes: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(sorted(names))})"
            raise ConfigError(f"{path}: unknown key{hint}")
        current = getattr(obj, key)
        changes[key] = _apply(current, value, path) if is_dataclass(current) else _coerce(value, hints[key], path)
    try:
        return replace(obj, **changes)
    except TypeError as exc:
        raise ConfigError(f"{where or 'config'}: {exc}") from exc


def env_overrides(environ: Mapping[str, str]) -> dict[str, dict[str, str]]:
    """``PATCHCAST_SECTION__FIELD=value`` → ``{section: {field: value}}`` (lower-cased names)."""
    out: dict[str, dict[str, str]] = {}
    for key, value in environ.items():
        if key.startswith(ENV_PREFIX) and "__" in key:
            section, _, name = key[len(ENV_PREFIX):].lower().partition("__")
            out.setdefault(section, {})[name] = value
    return out


def read_file(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read config ({exc.strerror})") from exc
    try:
        if p.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = tomllib.loads(text)
    except Exception as exc:  # tomllib/yaml each raise their own error types
        raise ConfigError(f"{p}: not valid {'YAML' if p.suffix in ('.yaml', '.yml') else 'TOML'}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a table of sections")
    return data


def load_config(path: str | Path | None = None, *, overrides: Mapping[str, Mapping[str, Any]] | None = None,
                environ: Mapping[str, str] | None = None) -> Config:
    """Defaults → file → environment → overrides; raises :class:`ConfigError` on anything unknown or invalid."""
    cfg = Config()
    if path is not None:
        cfg = _apply(cfg, read_file(path), "")
    cfg = _apply(cfg, env_overrides(os.environ if environ is None else environ), "")
    if overrides:
        cfg = _apply(cfg, {s: {k: v for k, v in kv.items() if v is not None} for s, kv in overrides.items()}, "")
    return typing.cast(Config, cfg)


def describe(obj: Any = None, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted name, default, description) for every field: the reference for config files."""
    obj = Config() if obj is None else obj
    rows: list[tuple[str, str, str]] = []
    for f in fields(obj):
        value = getattr(obj, f.name)
        name = f"{prefix}{f.name}"
        if is_dataclass(value):
            rows.append((f"[{name}]", "", f.metadata.get("help", "")))
            rows.extend(describe(value, f"{name}."))
        else:
            assert f.default is not MISSING or f.default_factory is not MISSING
            rows.append((name, repr(value), f.metadata.get("help", "")))
    return rows


def to_toml(cfg: Config) -> str:
    """Render a config as TOML (for ``patchcast config --show``)."""
    lines: list[str] = []
    for section in fields(cfg):
        lines.append(f"[{section.name}]")
        sub = getattr(cfg, section.name)
        for f in fields(sub):
            v = getattr(sub, f.name)
            if isinstance(v, bool):
                text = "true" if v else "false"
            elif isinstance(v, str):
                text = '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
            else:
                text = repr(v)
            lines.append(f"{f.name} = {text}  # {f.metadata.get('help', '')}")
        lines.append("")
    return "\n".join(lines)
