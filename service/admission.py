"""Admission control: bounds on the work the server holds at once, so a burst is answered with
fast refusals (503 + ``Retry-After``) instead of queueing until memory runs out.

Two bounds, both settings: inference requests in flight (``CPCNN_MAX_IN_FLIGHT``: each may hold a
body of up to ``CPCNN_MAX_BODY_BYTES`` while it is read, decoded and run) and pixels being decoded
(``CPCNN_MAX_PIXELS_IN_FLIGHT``, as the images' headers declare them: ~3 bytes of RGB each, plus
the decoder's working copy). The first is taken by the two inference endpoints before they read
a body (``routes.classify.classify_images``, ``routes.v2.infer``); the second by the decoder
(``service.decode.decode_request``) once the headers are parsed.
Refusals are counted in ``cpcnn_overload_rejections_total{bound}``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import Counter, Gauge

from service.errors import Overloaded

RETRY_AFTER_S = 1


class Admission:
    """Counters of requests and decoded pixels in flight, shared by the event loop and the
    decoding threads (hence a lock)."""

    def __init__(self, max_requests: int, max_pixels: int, rejections: Counter,
                 pixels_gauge: Gauge) -> None:
        self.max_requests, self.max_pixels = max_requests, max_pixels
        self.requests = self.pixels = 0
        self._lock = threading.Lock()
        self._rejections = {bound: rejections.labels(bound=bound) for bound in ("requests", "pixels")}
        self._pixels_gauge = pixels_gauge

    @contextmanager
    def request(self) -> Iterator[None]:
        """One inference request in flight, or ``Overloaded`` when ``max_requests`` are."""
        with self._lock:
            if self.requests >= self.max_requests:
                self._rejections["requests"].inc()
                raise Overloaded(
                    f"the server is at its limit of {self.max_requests} inference requests in "
                    f"flight (CPCNN_MAX_IN_FLIGHT): retry in {RETRY_AFTER_S} s",
                    headers={"Retry-After": str(RETRY_AFTER_S)})
            self.requests += 1
        try:
            yield
        finally:
            with self._lock:
                self.requests -= 1

    @contextmanager
    def decoding(self, pixels: int) -> Iterator[None]:
        """``pixels`` being decoded, or ``Overloaded`` when they would pass ``max_pixels``."""
        with self._lock:
            if self.pixels + pixels > self.max_pixels:
                self._rejections["pixels"].inc()
                raise Overloaded(
                    f"the server is decoding {self.pixels} pixels for other requests; this one's "
                    f"{pixels} would pass its limit of {self.max_pixels} "
                    f"(CPCNN_MAX_PIXELS_IN_FLIGHT): retry in {RETRY_AFTER_S} s",
                    headers={"Retry-After": str(RETRY_AFTER_S)})
            self.pixels += pixels
            self._pixels_gauge.set(self.pixels)
        try:
            yield
        finally:
            with self._lock:
                self.pixels -= pixels
                self._pixels_gauge.set(self.pixels)
