"""PackageRunner on the shipped synthetic package: IOBinding changes nothing but where tensors live."""

from __future__ import annotations

import numpy as np
import pytest

from service.runner import PackageRunner
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
    plain = PackageRunner(SHIPPED_PACKAGE, io_binding=False, verify=False)
    bound = PackageRunner(SHIPPED_PACKAGE, io_binding=True, verify=False)
    assert not plain.io_binding and bound.io_binding
    a, b = plain.run(images, tau), bound.run(images, tau)
    if tau < 1:  # images go to different heads: heads run on subsets (the host-gather path)
        assert len({p.activation.heads[0] for p in a.predictions}) > 1
    for pa, pb in zip(a.predictions, b.predictions, strict=True):
        assert pa.activation == pb.activation
        assert pa.flops == pb.flops
        np.testing.assert_allclose(pa.scores, pb.scores, rtol=1e-5, atol=1e-6)


def test_io_binding_is_off_on_cpu_by_default():
    assert PackageRunner(SHIPPED_PACKAGE, verify=False).io_binding is False


def test_route_on_shared_outputs_is_run(images):
    """The τ sweep computes trunk + clustifier once and routes per τ: same answers as run()."""
    from service.runner import normalize

    runner = PackageRunner(SHIPPED_PACKAGE, verify=False)
    features, logits = runner.shared(normalize(images, runner.manifest.input))
    for tau in (0.0, 0.8, 1.0):
        direct, routed = runner.run(images, tau), runner.route(features, logits, tau)
        assert set(direct.timings) == {"trunk", "clustifier", "activator", "heads", "combine"}
        for a, b in zip(direct.predictions, routed.predictions, strict=True):
            assert a.activation == b.activation and a.flops == b.flops
            np.testing.assert_array_equal(a.scores, b.scores)


@pytest.mark.parametrize("tau", [0.0, 0.95, 1.0])
def test_heads_run_at_once_give_the_same_predictions(images, tau):
    """Several heads of a batch on the head pool (the default) or one after another: every
    image gets the same heads, weights and scores."""
    pooled = PackageRunner(SHIPPED_PACKAGE, verify=False)  # the default: two heads at once
    serial = PackageRunner(SHIPPED_PACKAGE, verify=False, head_workers=1)
    assert pooled._head_pool is not None and serial._head_pool is None  # noqa: SLF001
    a, b = pooled.run(images, tau), serial.run(images, tau)
    assert len({h for p in a.predictions for h in p.activation.heads}) > 1  # several groups ran
    for pa, pb in zip(a.predictions, b.predictions, strict=True):
        assert pa.activation == pb.activation and pa.flops == pb.flops
        np.testing.assert_allclose(pa.scores, pb.scores, rtol=1e-5, atol=1e-6)


def test_head_pool_is_off_with_io_binding():
    runner = PackageRunner(SHIPPED_PACKAGE, verify=False, io_binding=True, head_workers=2)
    assert runner._head_pool is None  # noqa: SLF001


def test_head_threads_default_divides_the_cores_among_head_workers():
    def head_threads(runner):
        return runner._sessions["head0"].session.get_session_options().intra_op_num_threads  # noqa: SLF001

    assert head_threads(PackageRunner(SHIPPED_PACKAGE, verify=False, intra_op_threads=4)) == 2
    assert head_threads(PackageRunner(SHIPPED_PACKAGE, verify=False, intra_op_threads=1)) == 1
    assert head_threads(PackageRunner(SHIPPED_PACKAGE, verify=False, intra_op_threads=4,
                                      head_workers=1)) == 4
    assert head_threads(PackageRunner(SHIPPED_PACKAGE, verify=False, intra_op_threads=4,
                                      head_threads=3)) == 3


def test_normalize_is_the_training_formula_in_nchw():
    from service.manifest import InputSpec
    from service.runner import normalize

    spec = InputSpec(size=5, mean=[0.4, 0.5, 0.6], std=[0.2, 0.25, 0.3])
    images = np.random.default_rng(0).integers(0, 256, (3, 5, 5, 3), dtype=np.uint8)
    x = normalize(images, spec)
    want = ((images / 255 - np.array(spec.mean)) / np.array(spec.std)).transpose(0, 3, 1, 2)
    assert x.dtype == np.float32 and x.shape == (3, 3, 5, 5) and x.flags["C_CONTIGUOUS"]
    np.testing.assert_allclose(x, want, rtol=0, atol=2e-6)
    with pytest.raises(ValueError, match="expected 5x5"):
        normalize(images[:, :4], spec)
