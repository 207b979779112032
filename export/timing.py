"""Time ONNX graphs on the serving runtime, side by side, the way ``make bench`` compares modes.

FLOPs are a poor proxy for time on a CPU: a conv with a quarter of the channels runs at a fraction
of the FLOP rate of a wide one, and every graph call has a fixed cost. So the export measures what
it chooses between. Each round runs every graph once, in an order rotated per round, so drift in
the machine (another process, clock changes) hits every graph alike; the figure kept per graph and
batch size is the median over rounds.
"""

from __future__ import annotations

import logging
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tqdm.auto import tqdm

from modelpack.manifest import TimingInfo
from modelpack.ort_backend import session_options

logger = logging.getLogger(__name__)

BATCH_SIZES = (1, 32)  # one request alone, and a full dynamic batch (the service's default max)


def cpu_name() -> str:
    """The processor's model name (``/proc/cpuinfo`` on Linux), else what ``platform`` says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def time_graphs(graphs: dict[str, Path], input_shapes: dict[str, tuple[int, ...]], *,
                batch_sizes: tuple[int, ...] = BATCH_SIZES, rounds: int = 15, warmup: int = 3,
                threads: int = 0) -> tuple[dict[str, dict[int, float]], TimingInfo]:
    """Median milliseconds per run of each graph at each batch size, measured interleaved.

    ``graphs`` maps a name to an ONNX file with one input; ``input_shapes`` gives the input shape
    without the batch axis for each name. Returns ``{name: {batch: ms}}`` and how it was measured.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    sessions = {name: ort.InferenceSession(str(path), sess_options=session_options(threads),
                                           providers=["CPUExecutionProvider"])
                for name, path in graphs.items()}
    names = list(graphs)
    rng = np.random.default_rng(0)
    times: dict[str, dict[int, list[float]]] = {n: {b: [] for b in batch_sizes} for n in names}
    for b in batch_sizes:
        feeds = {n: {sessions[n].get_inputs()[0].name:
                     rng.standard_normal((b, *input_shapes[n])).astype(np.float32)} for n in names}
        for n in names:
            for _ in range(warmup):
                sessions[n].run(None, feeds[n])
        for r in tqdm(range(rounds), desc=f"timing batch {b}", leave=False):
            for n in names[r % len(names):] + names[:r % len(names)]:
                t0 = time.perf_counter()
                sessions[n].run(None, feeds[n])
                times[n][b].append((time.perf_counter() - t0) * 1e3)
    medians = {n: {b: statistics.median(v) for b, v in per.items()} for n, per in times.items()}
    info = TimingInfo(runtime=f"onnxruntime {ort.__version__} CPUExecutionProvider",
                      threads=threads, batch_sizes=list(batch_sizes), repetitions=rounds,
                      cpu=cpu_name())
    for n in names:
        logger.info("timed %-28s %s", n, ", ".join(f"b{b} {medians[n][b]:.3f} ms" for b in batch_sizes))
    return medians, info


def relative_time(latency: dict[int, float], reference: dict[int, float]) -> float:
    """Σ over batch sizes of latency / the reference's: batch 1 and batch 32 weigh alike."""
    return sum(latency[b] / reference[b] for b in reference)
