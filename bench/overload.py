"""The soak's overload and shutdown phases (``bench/soak.py``): a burst far past the admission
bounds, and SIGTERM while an upload is stalled.

A burst: ``clients`` requests at once, each of ``images`` large PNGs. Every answer must be a 200
or a fast 503 with ``Retry-After`` (admission control, ``service.admission``); the server's RSS is
sampled through it, and once more after ``settle`` seconds, with a plain request's latency then.
"""

from __future__ import annotations

import asyncio
import io
import socket
import statistics
import time
from collections import Counter
from collections.abc import Callable

import httpx
import numpy as np
from PIL import Image


def large_png(width: int = 2000, height: int = 1500) -> bytes:
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x % 256, y % 256, (x + y) % 256], axis=-1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


async def burst(base: str, rss_kib: Callable[[], int], clients: int = 200, images: int = 4,
                settle: float = 5.0) -> dict:
    """``clients`` requests of ``images`` 3 MP PNGs at once; what came back and what it cost."""
    blob = large_png()
    files = [("file", (f"{i}.png", blob, "image/png")) for i in range(images)]
    before, peak, done = rss_kib(), [rss_kib()], asyncio.Event()

    async def sample() -> None:
        while not done.is_set():
            peak.append(rss_kib())
            await asyncio.sleep(0.1)

    async def one(client: httpx.AsyncClient) -> tuple[int, float, str | None]:
        t0 = time.perf_counter()
        try:
            r = await client.post(f"{base}/classify", files=files)
        except httpx.HTTPError as e:
            return -1, time.perf_counter() - t0, type(e).__name__
        return r.status_code, time.perf_counter() - t0, r.headers.get("retry-after")

    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        sampler = asyncio.create_task(sample())
        t0 = time.perf_counter()
        answers = await asyncio.gather(*(one(client) for _ in range(clients)))
        seconds = time.perf_counter() - t0
        done.set()
        await sampler
        await asyncio.sleep(settle)
        t1 = time.perf_counter()
        probe = await client.post(f"{base}/classify", files=files[:1])
        probe_seconds = time.perf_counter() - t1
    statuses = Counter(status for status, _, _ in answers)
    refused = [s for status, s, _ in answers if status == 503]
    return {
        "clients": clients, "images_per_request": images, "seconds": seconds,
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "refusals_with_retry_after": sum(1 for st, _, ra in answers if st == 503 and ra),
        "refusal_p50_ms": statistics.median(refused) * 1000 if refused else None,
        "ok_p50_ms": statistics.median([s for st, s, _ in answers if st == 200]) * 1000
        if statuses[200] else None,
        "rss_before_kib": before, "rss_peak_kib": max(peak), "rss_after_kib": rss_kib(),
        "probe_status": probe.status_code, "probe_ms": probe_seconds * 1000,
        "ok": set(statuses) <= {200, 503} and statuses[200] > 0 and probe.status_code == 200
        and sum(1 for st, _, ra in answers if st == 503 and not ra) == 0,
    }


def stall_upload(port: int) -> socket.socket:
    """A connection that sent its headers and 1 KB of a 1 MB body, then nothing: SIGTERM must
    still end the server within its grace period."""
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"POST /classify HTTP/1.1\r\nHost: soak\r\nContent-Type: image/png\r\n"
              b"Content-Length: 1000000\r\n\r\n" + b"\0" * 1000)
    return s
