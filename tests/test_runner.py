"""PackageRunner on the shipped synthetic package: IOBinding changes nothing but where tensors live."""

from __future__ import annotations

import numpy as np
import pytest

from modelpack.backend import RunnerOptions
from modelpack.runner import PackageRunner
from tests.conftest import SHIPPED_PACKAGE


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    """Images of every synthetic class, so that they route to different heads."""
    from training.data.synthetic import make_synthetic

    data = make_synthetic(superclasses=4, classes_per_super=3, per_class=2, image_size=32,
                          noise=0.75, seed=1)
    return data.images  # (24, 32, 32, 3) uint8


@pytest.mark.parametrize("tau", [0.0, 0.7, 0.95, 1.0])
def test_io_binding_gives_the_same_predictions(images, tau):
    plain = PackageRunner(SHIPPED_PACKAGE, RunnerOptions(io_binding=False), verify=False)
    bound = PackageRunner(SHIPPED_PACKAGE, RunnerOptions(io_binding=True), verify=False)
    assert not plain.backend.io_binding and bound.backend.io_binding
    a, b = plain.run(images, tau), bound.run(images, tau)
    if tau < 1:  # images go to different heads: heads run on subsets (the host-gather path)
        assert len({p.activation.heads[0] for p in a.predictions}) > 1
    for pa, pb in zip(a.predictions, b.predictions, strict=True):
        assert pa.activation == pb.activation
        assert pa.flops == pb.flops
        np.testing.assert_allclose(pa.scores, pb.scores, rtol=1e-5, atol=1e-6)


def test_io_binding_is_off_on_cpu_by_default():
    assert PackageRunner(SHIPPED_PACKAGE, verify=False).backend.io_binding is False


def test_route_on_shared_outputs_is_run(images):
    """The τ sweep computes trunk + clustifier once and routes per τ: same answers as run()."""
    from modelpack.runner import normalize

    runner = PackageRunner(SHIPPED_PACKAGE, verify=False)
    shared = runner.shared(normalize(images, runner.manifest.input))
    for tau in (0.0, 0.8, 1.0):
        direct, routed = runner.run(images, tau), runner.route(shared, tau)
        assert set(direct.timings) == {"trunk", "clustifier", "activator", "heads", "combine"}
        for a, b in zip(direct.predictions, routed.predictions, strict=True):
            assert a.activation == b.activation and a.flops == b.flops
            np.testing.assert_array_equal(a.scores, b.scores)


@pytest.mark.parametrize("tau", [0.0, 0.95, 1.0])
def test_heads_run_at_once_give_the_same_predictions(images, tau):
    """Several heads of a batch on the head pool (the default) or one after another: every
    image gets the same heads, weights and scores."""
    pooled = PackageRunner(SHIPPED_PACKAGE, verify=False)  # the default: two heads at once
    serial = PackageRunner(SHIPPED_PACKAGE, RunnerOptions(head_workers=1), verify=False)
    assert pooled._head_pool is not None and serial._head_pool is None  # noqa: SLF001
    a, b = pooled.run(images, tau), serial.run(images, tau)
    assert len({h for p in a.predictions for h in p.activation.heads}) > 1  # several groups ran
    for pa, pb in zip(a.predictions, b.predictions, strict=True):
        assert pa.activation == pb.activation and pa.flops == pb.flops
        np.testing.assert_allclose(pa.scores, pb.scores, rtol=1e-5, atol=1e-6)


def spy_on_head_pool(runner: PackageRunner) -> list[int]:
    """Record how many head groups each batch hands the runner's head pool."""
    pool, mapped = runner._head_pool, []  # noqa: SLF001

    class SpyPool:
        def map(self, fn, groups):
            groups = list(groups)
            mapped.append(len(groups))
            return pool.map(fn, groups)

    runner._head_pool = SpyPool()  # noqa: SLF001
    return mapped


def spy_on_wide_heads(runner: PackageRunner) -> list[str]:
    """Record which heads run on their session on every core, in order."""
    calls: list[str] = []
    for role, session in list(runner.backend._wide_heads.items()):  # noqa: SLF001
        runner.backend._wide_heads[role] = lambda x, role=role, run=session: calls.append(role) or run(x)  # noqa: SLF001
    return calls


def test_a_lone_images_heads_run_one_after_another(images):
    """Heads with less work in the batch than ``heads_at_once_mflops`` run one after another on
    the calling thread (the hop to the pool costs more than it wins there); with the line between
    one image's work and two images', a lone image's heads do, and batches of several images run
    them on the pool. Either way the answers are the serial runner's."""
    one_image = sum(PackageRunner(SHIPPED_PACKAGE, verify=False).head_flops) / 1e6  # τ = 1
    pooled = PackageRunner(SHIPPED_PACKAGE, RunnerOptions(heads_at_once_mflops=1.5 * one_image), verify=False)
    serial = PackageRunner(SHIPPED_PACKAGE, RunnerOptions(head_workers=1), verify=False)
    mapped = spy_on_head_pool(pooled)
    k = pooled.manifest.num_clusters
    for batch, pool_calls in ((images[:1], []), (images[3:4], []), (images[:2], [k]),
                              (images[:8], [k])):
        mapped.clear()
        got, want = pooled.run(batch, 1.0), serial.run(batch, 1.0)  # τ = 1: every head
        assert mapped == pool_calls
        for a, b in zip(got.predictions, want.predictions, strict=True):
            assert a.activation == b.activation and len(a.activation.heads) == k
            np.testing.assert_allclose(a.scores, b.scores, rtol=1e-5, atol=1e-6)


def test_a_lone_big_head_runs_on_every_core(images):
    """Heads of at least ``wide_head_mflops`` per image also get a session on every core, taken
    when all images of a batch go to that head; the answers are those of the head's own session,
    and a batch with several heads keeps the per-worker sessions (the head pool)."""
    wide = PackageRunner(SHIPPED_PACKAGE, RunnerOptions(threads=2,
                         wide_head_mflops=1e-9,  # every head
                         heads_at_once_mflops=0), verify=False)  # several heads: always the pool
    narrow = PackageRunner(SHIPPED_PACKAGE, RunnerOptions(threads=2, wide_head_mflops=0), verify=False)
    assert narrow.backend._wide_heads == {}  # noqa: SLF001  (0: off)
    head_threads = {role: s.session.get_session_options().intra_op_num_threads
                    for role, s in wide.backend._wide_heads.items()}  # noqa: SLF001
    assert set(head_threads) == {f"head{h}" for h in range(wide.manifest.num_clusters)}
    assert set(head_threads.values()) == {2}
    assert wide.backend._sessions["head0"].session.get_session_options().intra_op_num_threads == 1  # noqa: SLF001

    calls = spy_on_wide_heads(wide)
    lone = [wide.run(img[None], 0.0) for img in images]  # τ = 0: one head per image
    assert calls == [f"head{r.predictions[0].activation.heads[0]}" for r in lone]
    for got, image in zip(lone, images, strict=True):
        want = narrow.run(image[None], 0.0).predictions[0]
        assert got.predictions[0].activation == want.activation
        np.testing.assert_allclose(got.predictions[0].scores, want.scores, rtol=1e-5, atol=1e-6)
    calls.clear()
    mixed = wide.run(images, 0.0)  # several heads in one batch: the pool, one core each
    assert calls == [] and len({p.activation.heads[0] for p in mixed.predictions}) > 1
    calls.clear()
    wide.run(images, 1.0)  # τ = 1: every head on every image
    assert calls == []


@pytest.mark.parametrize(("line_over_work", "pooled"), [(0.5, True), (2.0, False)])
def test_heads_with_enough_work_go_to_the_pool_even_for_a_lone_image(images, line_over_work,
                                                                     pooled):
    """The line is work, not images: a lone image whose heads are big (the latency probe's
    168-MFLOP heads: 6.3 ms on the pool against 10.4-11.2 ms one after another) runs them on the
    pool; below the line, heads run one after another, each on its session on every core where
    it has one."""
    work = sum(PackageRunner(SHIPPED_PACKAGE, verify=False).head_flops) / 1e6  # a lone image, τ = 1
    runner = PackageRunner(SHIPPED_PACKAGE, RunnerOptions(threads=2,
                           wide_head_mflops=1e-9, heads_at_once_mflops=line_over_work * work), verify=False)
    mapped, calls = spy_on_head_pool(runner), spy_on_wide_heads(runner)
    got = runner.run(images[:1], 1.0).predictions[0]
    k = runner.manifest.num_clusters
    assert mapped == ([k] if pooled else [])
    assert calls == ([] if pooled else [f"head{h}" for h in range(k)])
    want = PackageRunner(SHIPPED_PACKAGE, RunnerOptions(head_workers=1), verify=False).run(images[:1], 1.0)
    np.testing.assert_allclose(got.scores, want.predictions[0].scores, rtol=1e-5, atol=1e-6)


def test_only_heads_big_enough_get_a_session_on_every_core():
    flops = PackageRunner(SHIPPED_PACKAGE, verify=False).head_flops
    line = sorted(flops)[len(flops) // 2] / 1e6  # MFLOPs of the median head
    runner = PackageRunner(SHIPPED_PACKAGE, RunnerOptions(threads=2, wide_head_mflops=line), verify=False)
    assert set(runner.backend._wide_heads) == {f"head{h}" for h, f in enumerate(flops) if f >= line * 1e6}  # noqa: SLF001
    too_big = RunnerOptions(threads=2, wide_head_mflops=max(flops) / 1e6 * 2)
    assert PackageRunner(SHIPPED_PACKAGE, too_big, verify=False).backend._wide_heads == {}  # noqa: SLF001


def test_no_wide_heads_where_the_heads_have_every_core_already():
    assert PackageRunner(SHIPPED_PACKAGE, RunnerOptions(threads=2,
                         head_workers=1), verify=False).backend._wide_heads == {}  # noqa: SLF001
    assert PackageRunner(SHIPPED_PACKAGE, RunnerOptions(threads=2,
                         head_threads=2), verify=False).backend._wide_heads == {}  # noqa: SLF001
    assert PackageRunner(SHIPPED_PACKAGE, RunnerOptions(io_binding=True), verify=False).backend._wide_heads == {}  # noqa: SLF001


def test_head_pool_is_off_with_io_binding():
    runner = PackageRunner(SHIPPED_PACKAGE, RunnerOptions(io_binding=True, head_workers=2), verify=False)
    assert runner._head_pool is None  # noqa: SLF001


def test_head_threads_default_divides_the_cores_among_head_workers():
    def head_threads(runner):
        return runner.backend._sessions["head0"].session.get_session_options().intra_op_num_threads  # noqa: SLF001

    assert head_threads(PackageRunner(SHIPPED_PACKAGE, RunnerOptions(threads=4), verify=False)) == 2
    assert head_threads(PackageRunner(SHIPPED_PACKAGE, RunnerOptions(threads=1), verify=False)) == 1
    assert head_threads(PackageRunner(SHIPPED_PACKAGE, RunnerOptions(threads=4,
                                      head_workers=1), verify=False)) == 4
    assert head_threads(PackageRunner(SHIPPED_PACKAGE, RunnerOptions(threads=4,
                                      head_threads=3), verify=False)) == 3


def test_normalize_is_the_training_formula_in_nchw():
    from modelpack.manifest import InputSpec
    from modelpack.runner import normalize

    spec = InputSpec(size=5, mean=[0.4, 0.5, 0.6], std=[0.2, 0.25, 0.3])
    images = np.random.default_rng(0).integers(0, 256, (3, 5, 5, 3), dtype=np.uint8)
    x = normalize(images, spec)
    want = ((images / 255 - np.array(spec.mean)) / np.array(spec.std)).transpose(0, 3, 1, 2)
    assert x.dtype == np.float32 and x.shape == (3, 3, 5, 5) and x.flags["C_CONTIGUOUS"]
    np.testing.assert_allclose(x, want, rtol=0, atol=2e-6)
    with pytest.raises(ValueError, match="expected 5x5"):
        normalize(images[:, :4], spec)
