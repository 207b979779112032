"""ONNX export of the CP-CNN parts: checker, parity with PyTorch, FLOP cross-check."""

import numpy as np
import onnxruntime as ort
import pytest
import torch

from export.onnx_export import ExportCheckError, export_onnx
from modelpack.ort_backend import session_options
from training.models.heads import HeadArch, HeadNet
from training.models.resnet import ResNet, ResNetConfig, build_trunk


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = ResNet(ResNetConfig(layers=(1, 1, 1), width=8, stem_stride=2, num_classes=7, input_size=32))
    # Non-trivial BatchNorm statistics, so folding BN into the convs is actually exercised.
    m.train()
    with torch.no_grad():
        for _ in range(3):
            m(torch.randn(16, 3, 32, 32) * 2 + 0.5)
    return m.eval()


@pytest.mark.parametrize("arch", [HeadArch("original"), HeadArch("b", ("bottleneck",), 0.5),
                                  HeadArch("c", ("compression",), 0.5),
                                  HeadArch("p", ("pruned", "pruned"), 0.5)])
def test_trunk_and_heads_match_pytorch(tmp_path, model, arch):
    trunk = build_trunk(model, "layer1")
    real = torch.randn(5, 3, 32, 32)
    rep = export_onnx(trunk, tmp_path / "trunk.onnx", input_shape=(3, 32, 32), real_inputs=real.numpy())
    assert rep.max_abs_diff <= 1e-4
    assert rep.flops == rep.torch_flops
    feats = trunk(real).detach()
    head = HeadNet(model, "layer1", arch, 3, [0, 2, 4]).eval()
    rep = export_onnx(head, tmp_path / "head.onnx", input_shape=tuple(feats.shape[1:]),
                      real_inputs=feats.numpy())
    assert rep.max_abs_diff <= 1e-4
    assert abs(rep.flops - rep.torch_flops) <= 0.01 * rep.torch_flops
    assert rep.input_shape[0] == "N"


def test_dynamic_batch_axis(tmp_path, model):
    export_onnx(model, tmp_path / "m.onnx", input_shape=(3, 32, 32))
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), sess_options=session_options(),
                                providers=["CPUExecutionProvider"])
    for n in (1, 4, 9):
        x = np.random.default_rng(n).standard_normal((n, 3, 32, 32)).astype(np.float32)
        out = sess.run(None, {"input": x})[0]
        assert out.shape == (n, 7)
        np.testing.assert_allclose(out, model(torch.from_numpy(x)).detach().numpy(), atol=1e-4)


def test_original_head_reproduces_original_model(model):
    """The 'original' family member starts as the original model restricted to its classes."""
    x = torch.randn(4, 3, 32, 32)
    head = HeadNet(model, "layer2", HeadArch("original"), 3, [1, 5, 6]).eval()
    with torch.no_grad():
        np.testing.assert_allclose(head(build_trunk(model, "layer2")(x)), model(x)[:, [1, 5, 6]],
                                   atol=1e-5)


def test_pruned_head_at_full_width_is_the_original_and_narrower_is_cheaper(model):
    """A pruned stage keeps the original's weights: at ratio 1 the head is the original
    restricted to its classes; halving the inner width cuts the tail's conv FLOPs."""
    from training.pipeline import module_flops

    x = torch.randn(4, 3, 32, 32)
    feats = build_trunk(model, "layer1")(x)
    full = HeadNet(model, "layer1", HeadArch("p", ("pruned", "pruned"), 1.0), 3, [1, 5, 6]).eval()
    with torch.no_grad():
        np.testing.assert_allclose(full(feats), model(x)[:, [1, 5, 6]], atol=1e-5)
    half = HeadNet(model, "layer1", HeadArch("p", ("pruned", "pruned"), 0.5), 3, [1, 5, 6]).eval()
    shape = tuple(feats.shape[1:])
    # layer2's 16 inner channels are already the floor (multiples of 16); layer3's 32 halve.
    assert module_flops(half, shape) < 0.8 * module_flops(full, shape)
    # The block outputs keep the original's channels: only the inner width shrank.
    assert half.body[-1][0].conv1[0].out_channels == 16  # layer3 of width 8 has 32 channels
    assert half.body[-1][0].conv2[0].out_channels == 32


def test_pruning_keeps_the_largest_filters(model):
    from training.models.heads import prune_stage

    stage = model.layer3
    pruned = prune_stage(stage, 0.25)
    conv1, bn1 = stage[0].conv1
    importance = conv1.weight.abs().sum((1, 2, 3)) * (bn1.weight / (bn1.running_var + bn1.eps).sqrt()).abs()
    kept = pruned[0].conv1[0].weight
    expected = conv1.weight[torch.sort(torch.topk(importance, kept.shape[0]).indices).values]
    torch.testing.assert_close(kept, expected)


def test_pretrained_clustifier_starts_as_the_originals_cluster_mass(model):
    """With pruned (here: full-width) stages a clustifier pools the original's class softmax."""
    groups = [[0, 1, 2], [3, 4], [5, 6]]
    x = torch.randn(6, 3, 32, 32)
    net = HeadNet(model, "layer1", HeadArch("c", ("pruned", "pruned"), 1.0), 3, groups=groups).eval()
    with torch.no_grad():
        out = net(build_trunk(model, "layer1")(x))
        p = torch.softmax(model(x), 1)
    expected = torch.stack([p[:, g].sum(1) for g in groups], 1)
    torch.testing.assert_close(torch.softmax(out, 1), expected, atol=1e-5, rtol=1e-4)


def test_parity_failure_raises(tmp_path, model):
    class Drifting(torch.nn.Module):
        """Differs between torch and the exported graph: a Python-side counter."""

        def __init__(self):
            super().__init__()
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            return x * float(self.calls)

    with pytest.raises(ExportCheckError, match="differs from PyTorch"):
        export_onnx(Drifting(), tmp_path / "d.onnx", input_shape=(4,))


def test_depth_cut_head_keeps_the_first_blocks_and_costs_less():
    """blocks=1 keeps each tail stage's first block (stride and projection shortcut) with the
    original's weights; the head is cheaper than the full-depth one and its widths are whole."""
    from training.models.heads import CHANNEL_MULTIPLE
    from training.pipeline import module_flops

    torch.manual_seed(0)
    deep = ResNet(ResNetConfig(layers=(2, 2, 2), width=16, stem_stride=2, num_classes=7,
                               input_size=32)).eval()
    full = HeadNet(deep, "layer1", HeadArch("o"), 3, [0, 1, 2]).eval()
    short = HeadNet(deep, "layer1", HeadArch("s", blocks=1), 3, [0, 1, 2]).eval()
    assert [len(stage) for stage in short.body] == [1, 1]
    torch.testing.assert_close(short.body[0][0].conv1[0].weight, deep.layer2[0].conv1[0].weight)
    shape = (16, 16, 16)
    assert module_flops(short, shape) < 0.7 * module_flops(full, shape)
    thin = HeadNet(deep, "layer1", HeadArch("t", ("pruned", "pruned"), 0.3, blocks=1), 3, [0, 1, 2])
    widths = [b.conv1[0].out_channels for stage in thin.body for b in stage]
    assert widths == [16, 16] and all(w % CHANNEL_MULTIPLE == 0 for w in widths)  # 0.3 × 32, 64
    with torch.no_grad():
        assert thin.eval()(torch.randn(2, *shape)).shape == (2, 3)


@pytest.mark.parametrize(("ratio", "width", "expected"),
                         [(0.125, 512, 64), (0.3, 64, 16), (0.3, 128, 32), (0.01, 256, 16),
                          (1.0, 8, 8), (2.0, 64, 64)])
def test_inner_width_is_a_multiple_of_16_within_the_stage(ratio, width, expected):
    from training.models.heads import inner_width

    assert inner_width(ratio, width) == expected


def test_negative_block_count_is_refused():
    with pytest.raises(ValueError, match="blocks must be >= 0"):
        HeadArch("x", blocks=-1)


def test_float16_storage_halves_the_file_and_folds_back_to_float32(tmp_path):
    """package.weights = "fp16": weights stored as float16 + Cast; ONNX Runtime folds the casts
    when it builds the session (its optimised graph has none left), outputs move by rounding only."""
    import onnx

    from export.storage import compare_outputs, store_float16

    torch.manual_seed(0)
    net = ResNet(ResNetConfig(layers=(1, 1), width=16, stem_stride=2, num_classes=7,
                              input_size=32)).eval()
    path = export_onnx(net, tmp_path / "m.onnx", input_shape=(3, 32, 32)).path
    fp32 = tmp_path / "m32.onnx"
    fp32.write_bytes(path.read_bytes())
    assert store_float16(path) > 0
    assert path.stat().st_size < 0.6 * fp32.stat().st_size
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in onnx.load(str(path)).graph.initializer)
    x = np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32)
    diff, scale = compare_outputs(fp32, path, [x])
    assert 0 < diff < 1e-2 and scale > 0
    options = session_options()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    optimized = onnx.load(str(tmp_path / "optimized.onnx"))
    assert not [n for n in optimized.graph.node if n.op_type == "Cast"]


def test_package_weights_setting_is_checked():
    from training.config import load_config

    assert load_config(None, ['package.weights="fp16"']).package.weights == "fp16"
    with pytest.raises(ValueError, match="package.weights"):
        load_config(None, ['package.weights="int8"'])
