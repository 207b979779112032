"""Every Prometheus metric of the service, on one injectable ``CollectorRegistry``.

Conventions (Prometheus naming guide): one prefix ``cpcnn_``, base units (seconds, FLOPs as a
plain count), counters end in ``_total``, ratios are left to PromQL. The FLOP saving over a window:

    1 - rate(cpcnn_flops_executed_total{mode="conditional"}[5m])
      / rate(cpcnn_original_flops_total{mode="conditional"}[5m])

Label values are bounded: endpoint (route template), method, status, stage, mode, head index.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Enum,
    Gauge,
    GCCollector,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)

from service.outcome import STAGES, ClassifyOutcome
from service.tau_controller import STATES

if TYPE_CHECKING:
    from modelpack.backend import Backend
    from modelpack.manifest import Manifest

PREFIX = "cpcnn"
MODES = ("conditional", "original")

# FLOPs per image spans ~1e4 (toy models) to ~1e12: four buckets per decade.
FLOPS_BUCKETS = tuple(round(10 ** (e / 4)) for e in range(16, 49))
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
HEADS_BUCKETS = (1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 16, 24, 32, 48, 64)
REQUEST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
STAGE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                 0.5, 1.0, 2.5)


class Metrics:
    """The service's collectors, registered on ``registry`` (one registry per app instance)."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, registry: CollectorRegistry | None = None, *,
                 process_metrics: bool = True) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        p = PREFIX
        if process_metrics:  # the standard process_*/python_* series, on this registry too
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
            GCCollector(registry=r)
        self.requests = Counter(f"{p}_requests", "HTTP requests by endpoint, method and status.",
                                ["endpoint", "method", "status"], registry=r)
        self.request_seconds = Histogram(
            f"{p}_request_duration_seconds", "HTTP request latency.", ["endpoint"],
            buckets=REQUEST_BUCKETS, registry=r)
        self.in_flight = Gauge(f"{p}_in_flight_requests", "HTTP requests being served now.",
                               registry=r)
        self.overload_rejections = Counter(
            f"{p}_overload_rejections", "Inference requests refused with 503 by an admission "
            "bound: requests in flight, or pixels being decoded.", ["bound"], registry=r)
        self.decoding_pixels = Gauge(f"{p}_decoding_pixels",
                                     "Pixels (as image headers declare them) being decoded now.",
                                     registry=r)
        self.stage_seconds = Histogram(
            f"{p}_stage_duration_seconds",
            "Time per classify request spent in each stage (decode/preprocess summed over its "
            "images; inference stages per batch).", ["stage"], buckets=STAGE_BUCKETS, registry=r)
        self.images = Counter(f"{p}_images", "Images classified.", ["mode"], registry=r)
        self.image_flops = Histogram(f"{p}_image_flops", "FLOPs executed per image.", ["mode"],
                                     buckets=FLOPS_BUCKETS, registry=r)
        self.flops_executed = Counter(f"{p}_flops_executed", "FLOPs executed.", ["mode"], registry=r)
        self.original_flops = Counter(
            f"{p}_original_flops",
            "FLOPs the original model would have spent on the same images.", ["mode"], registry=r)
        self.batch_size = Histogram(f"{p}_batch_size", "Images per model run (a micro-batch of "
                                    "requests, or one request when batching is off).", ["mode"],
                                    buckets=BATCH_BUCKETS, registry=r)
        self.heads_per_image = Histogram(f"{p}_heads_per_image", "Heads run per image.",
                                         buckets=HEADS_BUCKETS, registry=r)
        self.head_activations = Counter(f"{p}_head_activations", "Images routed to each head.",
                                        ["head"], registry=r)
        self.tau = Gauge(f"{p}_tau", "Current confusion threshold tau.", registry=r)
        self.tau_controller_state = Enum(
            f"{p}_tau_controller_state", "What the tau controller did in its last window (off: "
            "not running; idle: too few requests to judge).", states=list(STATES), registry=r)
        self.tau_controller_target = Gauge(
            f"{p}_tau_controller_target", "The tau controller's target, in base units.",
            ["quantity"], registry=r)
        self.tau_controller_measured = Gauge(
            f"{p}_tau_controller_measured", "The tau controller's measurement in its last window "
            "with enough requests, in base units.", ["quantity"], registry=r)
        self.tau_controller_changes = Counter(
            f"{p}_tau_controller_changes", "Changes of tau made by the controller.", ["direction"],
            registry=r)
        self.model_info = Info(f"{p}_model", "The model package being served, and the backend "
                               "and precision that run it.", registry=r)
        self.ready = Gauge(f"{p}_model_ready",
                                  "1 when the package is loaded and warmed up, else 0.", registry=r)
        self.reloads = Counter(f"{p}_reloads", "Hot reloads (POST /admin/reload) by result: ok, "
                               "rejected (a broken package) or timeout (abandoned past "
                               "CPCNN_RELOAD_TIMEOUT_S); on either the old one kept serving.",
                               ["result"], registry=r)
        # Children that exist at zero before the first request, kept for the per-request path:
        # ``labels()`` costs a few µs per call, a dozen calls per request.
        self._stage = {stage: self.stage_seconds.labels(stage=stage) for stage in STAGES}
        self._per_mode = {mode: (self.images.labels(mode=mode), self.image_flops.labels(mode=mode),
                                 self.flops_executed.labels(mode=mode),
                                 self.original_flops.labels(mode=mode)) for mode in MODES}
        for mode in MODES:
            self.batch_size.labels(mode=mode)
        for direction in ("up", "down"):
            self.tau_controller_changes.labels(direction=direction)
        for result in ("ok", "rejected", "timeout"):
            self.reloads.labels(result=result)
        self._heads: dict[int, Counter] = {}

    # -- model lifecycle -------------------------------------------------------------------
    def bind_model(self, manifest: Manifest, tau: float, backend: Backend) -> None:
        """Describe the served package and what runs it; one activation series per head, at 0.

        Called at start-up and on every hot reload; series of heads an earlier package had stay
        (counters never go back), the info metric names the package served now and its backend.
        """
        self.model_info.info({"name": manifest.name, "version": manifest.version,
                              "num_classes": str(len(manifest.class_names)),
                              "num_heads": str(manifest.num_clusters),
                              "backend": backend.name, "precision": backend.precision})
        for head in range(manifest.num_clusters):
            self._heads.setdefault(head, self.head_activations.labels(head=str(head)))
        self.tau.set(tau)

    def set_ready(self, ready: bool) -> None:
        self.ready.set(1 if ready else 0)

    # -- per request -----------------------------------------------------------------------
    def observe_request(self, endpoint: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint=endpoint, method=method, status=str(status)).inc()
        self.request_seconds.labels(endpoint=endpoint).observe(seconds)

    def observe_classification(self, outcome: ClassifyOutcome) -> None:
        for stage, seconds in outcome.stage_seconds.items():
            child = self._stage.get(stage) or self.stage_seconds.labels(stage=stage)
            child.observe(seconds)
        images, image_flops, executed, original = self._per_mode[outcome.mode]
        for image in outcome.images:
            flops = image.prediction.flops
            images.inc()
            image_flops.observe(flops.total)
            executed.inc(flops.total)
            original.inc(flops.original)
            activation = image.prediction.activation
            if activation is not None:
                self.heads_per_image.observe(len(activation.heads))
                for head in activation.heads:
                    child = self._heads.get(head)
                    if child is None:
                        child = self._heads[head] = self.head_activations.labels(head=str(head))
                    child.inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
