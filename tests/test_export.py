"""ONNX export of the CP-CNN parts: checker, parity with PyTorch, FLOP cross-check."""

import numpy as np
import onnxruntime as ort
import pytest
import torch

from export.onnx_export import ExportCheckError, export_onnx
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
                                  HeadArch("c", ("compression",), 0.5)])
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
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
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
