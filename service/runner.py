"""Execution of a model package with ONNX Runtime: trunk → clustifier → activator → heads → Eq. 3.

The runner owns the ONNX Runtime sessions (routes never touch one). It works on a batch of
already-decoded images and runs each head once per batch on just the images routed to it, so the
same code serves one request, a micro-batch of many, and the offline τ sweep.
"""

from __future__ import annotations

import logging
import os
import time
import weakref
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from service.activator import Activation, Activator, combine, fill_unrun, softmax
from service.manifest import Component, InputSpec, Manifest, load_manifest

logger = logging.getLogger(__name__)

STAGES = ("trunk", "clustifier", "activator", "heads", "combine")

# Several heads of a batch run two at once (the head pool) only when they have at least this many
# MFLOPs of work in the batch (images x head FLOPs, summed): below, the hop to the pool's threads
# and back costs more than the overlap wins, and the heads run one after another on the calling
# thread. Default model (19-MFLOP heads), 2 cores, heads stage: a batch-1 image routed to two
# heads (37 MFLOPs) took 0.77-0.91 ms one after another against 1.06-1.25 ms on the pool (4
# runs); batches of 2-4 images (~40-110 MFLOPs) were within noise either way (12 runs); from 5
# images (~135 MFLOPs) the pool was 13-33% faster (7 runs). Latency probe (168-MFLOP heads), a
# batch-1 image routed to all four: 6.30 / 6.46 ms on the pool, 11.17 / 10.38 ms one after
# another on one thread each, 7.41 / 7.19 ms on every core each (bench/README.md). The service
# reads it from CPCNN_HEADS_AT_ONCE_MFLOPS.
HEADS_AT_ONCE_MIN_MFLOPS = 100.0

# Heads of at least this many MFLOPs per image also get a session on every core, taken when they
# run one after another (``PackageRunner``'s comment has the measurements). The service reads it
# from CPCNN_WIDE_HEAD_MFLOPS.
WIDE_HEAD_MIN_MFLOPS = 40.0


@dataclass(frozen=True)
class Flops:
    """FLOPs spent on one image, and what the original model would have spent.

    In conditional mode total = trunk + clustifier + heads; in original mode the parts are 0 and
    total = original.
    """

    trunk: int
    clustifier: int
    heads: int
    original: int
    total: int

    @property
    def saving(self) -> float:
        """1 - total / original: the fraction of the original model's FLOPs avoided."""
        return 1.0 - self.total / self.original if self.original else 0.0


@dataclass
class Prediction:
    """Result for one image. ``activation``/``cluster_probs`` are None in original mode."""

    scores: np.ndarray  # (C,) final class scores, sum to 1
    flops: Flops
    activation: Activation | None = None
    cluster_probs: np.ndarray | None = None  # (K,)
    class_probs: np.ndarray | None = None  # (C,) the clustifier's own, when the top-5 fill is on


@dataclass(frozen=True)
class Shared:
    """What every image of a batch pays whatever τ is: trunk features and clustifier outputs."""

    features: np.ndarray | ort.OrtValue  # (N, C', H', W'); an OrtValue on the device with IOBinding
    cluster_logits: np.ndarray  # (N, K)
    class_logits: np.ndarray | None = None  # (N, C) when the clustifier exports them


@dataclass
class BatchResult:
    predictions: list[Prediction]
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage, whole batch


def normalize(images: np.ndarray, spec: InputSpec) -> np.ndarray:
    """(N, H, W, 3) uint8 RGB → (N, 3, H, W) float32, (pixel/255 − mean)/std, as in training."""
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"expected (N, H, W, 3) uint8 images, got {images.shape} {images.dtype}")
    if images.shape[1:3] != (spec.size, spec.size):
        raise ValueError(f"expected {spec.size}x{spec.size} images, got {images.shape[1:3]}")
    # Transpose the uint8 pixels first (a quarter of the bytes), then one multiply-add per
    # channel on contiguous memory: 0.28 ms for 32 images on 2 cores, against 3.8 ms for the
    # same arithmetic done on the float array and transposed afterwards (bench/README.md).
    mean = np.asarray(spec.mean, dtype=np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(spec.std, dtype=np.float32).reshape(1, 3, 1, 1)
    x = np.ascontiguousarray(images.transpose(0, 3, 1, 2)).astype(np.float32)
    x *= np.float32(1 / 255) / std
    x -= mean / std
    return x


# The process-wide ONNX Runtime thread pool, once ``share_thread_pool`` has set it up:
# (intra-op, inter-op) threads. ``None``: every session has threads of its own.
_shared_pool: tuple[int, int] | None = None
_own_threads_given = False  # whether session options with threads of their own were made


def share_thread_pool(intra_op: int = 0, inter_op: int = 1) -> bool:
    """Run every session made with ``session_options`` from now on on one process-wide pool.

    A package is a dozen sessions run one after another; with a pool each, every session wakes
    its own sleeping threads, while one shared pool keeps the same threads warm from the trunk
    to the heads: the conditional path at batch 1 took 1.39-1.53 ms against 2.00-2.38 ms with a
    pool per session, the original 1.69-1.87 against 2.25-2.42. The price: ONNX Runtime's global
    pool spins between runs (Python cannot turn that off), which starves other CPU work such as
    decoding in worker threads; the service uses it only when asked (bench/README.md).

    ONNX Runtime fixes this when its environment is created, i.e. before the process's first
    session: once any session has its own threads, or the pool exists with other sizes, the
    call changes nothing and says so (False / a warning). ``intra_op`` 0: one thread per core.
    """
    global _shared_pool
    if _shared_pool is not None:
        if _shared_pool != (intra_op, inter_op):
            logger.warning("the shared ONNX Runtime thread pool already has %d/%d threads; "
                           "keeping those, not %d/%d", *_shared_pool, intra_op, inter_op)
        return True
    if _own_threads_given:
        logger.warning("not sharing one ONNX Runtime thread pool: this process already has "
                       "sessions with threads of their own (set the pool up before any session)")
        return False
    ort.set_global_thread_pool_sizes(intra_op, inter_op)
    _shared_pool = (intra_op, inter_op)
    return True


def session_options(intra_op: int = 0, inter_op: int = 1,
                    allow_spinning: bool = False) -> ort.SessionOptions:
    """Options for every ONNX Runtime session of the project (runner, export check, bench).

    On the process's shared pool (``share_thread_pool``) the thread settings do not apply
    (ONNX Runtime refuses a session with threads of its own there); without it, the session
    gets a pool of ``intra_op`` threads (0: one per core)."""
    global _own_threads_given
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if _shared_pool is not None:  # thread counts here would only draw a warning per session
        options.use_per_session_threads = False
        return options
    _own_threads_given = True
    options.intra_op_num_threads = intra_op
    options.inter_op_num_threads = inter_op
    # Spinning threads answer the next op sooner but burn CPU between runs; with several
    # sessions and a decoder sharing few cores that can cost more than it saves (bench/).
    options.add_session_config_entry("session.intra_op.allow_spinning",
                                     "1" if allow_spinning else "0")
    return options


def default_providers() -> list[str]:
    """CUDA when this onnxruntime build has it, else CPU."""
    available = ort.get_available_providers()
    wanted = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return [p for p in wanted if p in available] or ["CPUExecutionProvider"]


class _Session:
    """One ONNX Runtime session, its single input and its outputs (the component's output first;
    a clustifier's class logits second when it has them)."""

    def __init__(self, path: Path, component: Component, options: ort.SessionOptions,
                 providers: Sequence[str]) -> None:
        self.session = ort.InferenceSession(str(path), sess_options=options, providers=list(providers))
        self.input_name = component.input_name
        self.output_name = component.output_name
        self.output_names = [component.output_name] + (
            [component.class_output] if component.class_output else [])
        # Where IOBinding leaves outputs: on the GPU when the session runs there.
        self.device = "cuda" if self.session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.session.run([self.output_name], {self.input_name: x})[0]

    def run_all(self, x: np.ndarray) -> list[np.ndarray]:
        return self.session.run(self.output_names, {self.input_name: x})

    def run_bound(self, x: np.ndarray | ort.OrtValue) -> list[ort.OrtValue]:
        """Run with IOBinding: a host array is copied in once, an ``OrtValue`` already on the
        device is used in place, and the outputs stay on the device for the next session."""
        binding = self.session.io_binding()
        if isinstance(x, np.ndarray):
            binding.bind_cpu_input(self.input_name, x)
        else:
            binding.bind_ortvalue_input(self.input_name, x)
        for name in self.output_names:
            binding.bind_output(name, self.device)
        self.session.run_with_iobinding(binding)
        return binding.get_outputs()


class PackageRunner:
    """Loads a package once and runs batches through it."""

    def __init__(
        self,
        package_dir: str | Path,
        *,
        providers: Sequence[str] | None = None,
        intra_op_threads: int = 0,
        inter_op_threads: int = 1,
        allow_spinning: bool = False,
        verify: bool = True,
        manifest: Manifest | None = None,
        io_binding: bool | None = None,
        head_threads: int | None = None,
        head_workers: int = 2,
        wide_head_mflops: float = WIDE_HEAD_MIN_MFLOPS,
        heads_at_once_mflops: float = HEADS_AT_ONCE_MIN_MFLOPS,
    ) -> None:
        self.package_dir = Path(package_dir)
        self.manifest = manifest or load_manifest(self.package_dir, verify=verify)
        m = self.manifest
        self.providers = list(providers) if providers else default_providers()
        options = session_options(intra_op_threads, inter_op_threads, allow_spinning)
        # Heads are small (a few % of the original's FLOPs) and get a handful of images each in
        # a batch: splitting each of their convs over every core gains little, so by default two
        # heads of a batch run at once (``head_workers``), the cores divided between them
        # (``head_threads``; 1 each on 2 cores). Measured on 2 cores against every head in turn
        # on both cores, 11 interleaved runs: batch 1 faster in 9 (up to 14%), equal in 2; batch
        # 32 faster in 8, 2-5% slower in 3 (bench/README.md).
        cores = intra_op_threads or os.cpu_count() or 1  # what the trunk's session gets
        if head_threads is None:
            head_threads = (intra_op_threads if head_workers <= 1 else
                            max(1, cores // head_workers))
        head_options = session_options(head_threads, inter_op_threads, allow_spinning)
        self._sessions = {
            role: _Session(self.package_dir / comp.file, comp,
                           head_options if role.startswith("head") else options, self.providers)
            for role, comp in m.components().items()
        }
        # IOBinding (default: on when the trunk runs on CUDA): the trunk's features stay on the
        # GPU and feed the clustifier and the heads there; only the small logits come back.
        self.io_binding = (self._sessions["trunk"].device == "cuda" if io_binding is None
                           else io_binding)
        # A pool for running several heads of one batch at once (CPU path only: on a GPU the
        # heads share one device and IOBinding keeps their inputs there), taken by a batch whose
        # heads have at least ``heads_at_once_mflops`` of work (``CPCNN_HEADS_AT_ONCE_MFLOPS``).
        self._head_pool: ThreadPoolExecutor | None = None
        self.heads_at_once_flops = heads_at_once_mflops * 1e6
        # Heads big enough to split (``wide_head_mflops`` per image; 0: none) also get a session
        # on every core, taken when heads run one after another (a batch's images all go to that
        # head, or too little work for the pool, ``heads_at_once_mflops``): with two heads at once
        # a lone head ran on one of two cores beside an idle one, 2.44 ms against 1.32 ms on both
        # for a 168-MFLOP head at batch 1, while a 19-MFLOP head took the same time either way
        # (bench/README.md). Only those heads pay the memory of a second session.
        self._wide_heads: dict[str, _Session] = {}
        if head_workers > 1 and not self.io_binding:
            self._head_pool = ThreadPoolExecutor(head_workers, thread_name_prefix="cpcnn-heads")
            weakref.finalize(self, self._head_pool.shutdown, wait=False)
            if wide_head_mflops > 0 and 0 < head_threads < cores and not self.shared_thread_pool:
                self._wide_heads = {
                    f"head{c.index}": _Session(self.package_dir / c.head.file, c.head, options,
                                               self.providers)
                    for c in m.clusters if c.head.flops >= wide_head_mflops * 1e6}
        self.activator = Activator(
            np.asarray(m.clustifier_confusion),
            ranking=m.activator.ranking,
            weighting=m.activator.weighting,
            smoothing=m.activator.smoothing,
        )
        self.combination = m.activator.combination
        self.fill = m.activator.fill
        self.clusters = m.cluster_members
        self.num_classes = len(m.class_names)
        self.head_flops = [c.head.flops for c in m.clusters]
        logger.info("loaded package %s %s from %s (%d heads, providers %s, %s)",
                    m.name, m.version, self.package_dir, m.num_clusters, self.providers,
                    "one shared thread pool" if self.shared_thread_pool else "a thread pool per session")

    @property
    def shared_thread_pool(self) -> bool:
        """Whether the sessions run on the process's shared pool (``share_thread_pool``)."""
        return not self._sessions["trunk"].session.get_session_options().use_per_session_threads

    # -- conditional path -------------------------------------------------------------------
    def run(self, images: np.ndarray, tau: float | Sequence[float] | None = None) -> BatchResult:
        """CP-CNN inference on (N, H, W, 3) uint8 images at threshold ``tau`` (default: manifest's).

        ``tau`` may be one value for the batch or one per image (a micro-batch mixes requests).
        """
        tau = self.manifest.activator.default_tau if tau is None else tau
        return self.run_normalized(normalize(images, self.manifest.input), tau)

    def run_normalized(self, x: np.ndarray, tau: float | Sequence[float]) -> BatchResult:
        """CP-CNN inference on an already normalised (N, 3, H, W) float32 batch."""
        shared, timings = self._shared(x)
        result = self.route(shared, tau)
        result.timings = {**timings, **result.timings}
        return result

    def shared(self, x: np.ndarray) -> Shared:
        """Trunk features and clustifier outputs of a normalised batch: the part of the work
        every image pays whatever τ is. With IOBinding the features stay on the device."""
        return self._shared(x)[0]

    def _shared(self, x: np.ndarray) -> tuple[Shared, dict[str, float]]:
        t0 = time.perf_counter()
        clustifier = self._sessions["clustifier"]
        if self.io_binding:
            features = self._sessions["trunk"].run_bound(x)[0]  # OrtValue (N, C', H', W') on device
            t1 = time.perf_counter()
            outputs = [o.numpy() for o in clustifier.run_bound(features)]
        else:
            features = self._sessions["trunk"](x)  # (N, C', H', W')
            t1 = time.perf_counter()
            outputs = clustifier.run_all(features)
        shared = Shared(features, outputs[0], outputs[1] if len(outputs) > 1 else None)
        return shared, {"trunk": t1 - t0, "clustifier": time.perf_counter() - t1}

    def route(self, shared: Shared, tau: float | Sequence[float]) -> BatchResult:
        """Activator → the chosen heads → Eq. 3 (→ the top-5 fill), on ``shared()``'s outputs.

        ``tau`` may be one value for the batch or one per image (a micro-batch mixes requests).
        The offline τ sweep calls this once per τ on features it computed once.
        """
        cluster_logits = shared.cluster_logits
        taus = np.broadcast_to(np.asarray(tau, dtype=np.float64), (len(cluster_logits),))
        t2 = time.perf_counter()
        cluster_probs = softmax(cluster_logits, axis=1)  # (N, K)
        # Only the top-5 fill reads the clustifier's class probabilities: no softmax otherwise.
        class_probs = softmax(shared.class_logits, axis=1) if self.fill == "clustifier" else None
        activations = [self.activator.select(p, float(t)) for p, t in zip(cluster_probs, taus, strict=True)]
        t3 = time.perf_counter()
        head_logits = self._run_heads(shared.features, activations)
        t4 = time.perf_counter()
        m = self.manifest
        predictions = []
        for i, act in enumerate(activations):
            scores = combine(act, head_logits[i], self.clusters, self.num_classes,
                             self.combination)
            if self.fill == "clustifier":
                scores = fill_unrun(scores, act, self.clusters, class_probs[i])
            heads = sum(self.head_flops[h] for h in act.heads)
            flops = Flops(trunk=m.trunk.flops, clustifier=m.clustifier.flops, heads=heads,
                          original=m.original.flops, total=m.shared_flops() + heads)
            predictions.append(Prediction(scores, flops, act, cluster_probs[i],
                                          None if class_probs is None else class_probs[i]))
        t5 = time.perf_counter()
        return BatchResult(predictions, {"activator": t3 - t2, "heads": t4 - t3,
                                         "combine": t5 - t4})

    def head_logits(self, head: int, features: np.ndarray) -> np.ndarray:
        """One head's logits (N, |cluster|) on host trunk features: for diagnostics (every head on
        every image, whatever the activator would pick)."""
        return self._sessions[f"head{head}"](features)

    def _run_heads(self, features: np.ndarray | ort.OrtValue,
                   activations: list[Activation]) -> list[dict[int, np.ndarray]]:
        """Run each head once on just the images routed to it; per image, head → its logits.

        ``features`` is a host array, or with IOBinding an ``OrtValue`` on the device: a head that
        takes the whole batch reads it in place; a subset is gathered from one host copy.
        """
        routed: dict[int, list[int]] = {}
        for i, act in enumerate(activations):
            for h in act.heads:
                routed.setdefault(h, []).append(i)
        groups = sorted(routed.items())
        host = features if isinstance(features, np.ndarray) else None
        if host is None and any(len(idx) < len(activations) for _, idx in groups):
            host = features.numpy()  # (N, C', H', W'), once per batch

        def run_head(group: tuple[int, list[int]], every_core: bool = False) -> np.ndarray:
            h, idx = group
            role = f"head{h}"
            session = (every_core and self._wide_heads.get(role)) or self._sessions[role]
            batch = features if len(idx) == len(activations) else host[idx]
            return session.run_bound(batch)[0].numpy() if self.io_binding else session(batch)

        work = sum(len(idx) * self.head_flops[h] for h, idx in groups)
        if self._head_pool is not None and len(groups) > 1 and work >= self.heads_at_once_flops:
            results = list(self._head_pool.map(run_head, groups))
        else:  # one after another: a head with a session on every core takes it
            results = [run_head(g, every_core=True) for g in groups]
        out: list[dict[int, np.ndarray]] = [{} for _ in activations]
        for (h, idx), logits in zip(groups, results, strict=True):
            for row, i in enumerate(idx):
                out[i][h] = logits[row]
        return out

    # -- baseline path ----------------------------------------------------------------------
    def run_original(self, images: np.ndarray) -> BatchResult:
        """The original (unpartitioned) model on the same images, for A/B and the baseline."""
        x = normalize(images, self.manifest.input)
        t0 = time.perf_counter()
        scores = softmax(self._sessions["original"](x), axis=1)
        t1 = time.perf_counter()
        o = self.manifest.original.flops
        flops = Flops(trunk=0, clustifier=0, heads=0, original=o, total=o)
        preds = [Prediction(s, flops) for s in scores]
        return BatchResult(preds, {"original": t1 - t0})

    def warmup(self, batch_size: int = 1) -> None:
        """One pass through every session so the first real request pays no lazy init."""
        s = self.manifest.input.size
        images = np.zeros((batch_size, s, s, 3), dtype=np.uint8)
        self.run(images, tau=1.0)  # τ = 1 runs every head
        self.run_original(images)
