"""Net2WiderNet widening (training.models.widen): same function, wider, and free to diverge."""

import pytest
import torch

from training.models.resnet import ResNet, ResNetConfig
from training.models.widen import widen_resnet


@pytest.fixture(scope="module")
def narrow():
    torch.manual_seed(0)
    m = ResNet(ResNetConfig(layers=(2, 1, 1), width=8, stem_stride=2, num_classes=5, input_size=32))
    m.train()
    with torch.no_grad():  # non-trivial BN statistics and affine parameters
        for _ in range(3):
            m(torch.randn(16, 3, 32, 32) * 2 + 0.5)
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.normal_(0, 0.3)
    return m.eval()


@pytest.mark.parametrize("factor", [2, 3])
def test_widened_model_computes_the_same_function(narrow, factor):
    wide = widen_resnet(narrow, 8 * factor, seed=1)
    assert wide.cfg.width == 8 * factor and wide.fc.in_features == 32 * factor
    x = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(wide.eval()(x), narrow(x), atol=1e-4, rtol=1e-4)
        # Train mode normalises with batch statistics: the copies see the same statistics.
        torch.testing.assert_close(wide.train()(x), narrow.train()(x), atol=1e-4, rtol=1e-4)
    narrow.eval()


def test_copies_diverge_under_training(narrow):
    """Random (not 1/f) shares give the copies different gradients; equal shares never would."""
    wide = widen_resnet(narrow, 16, seed=0).train()
    opt = torch.optim.SGD(wide.parameters(), lr=0.1)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 5, (8,))
    torch.nn.functional.cross_entropy(wide(x), y).backward()
    opt.step()
    w = wide.layer1[0].conv1[0].weight  # (16, 16, 3, 3): filter j and j + 8 started equal
    assert not torch.allclose(w[:8], w[8:])


def test_widening_needs_a_whole_multiple(narrow):
    with pytest.raises(ValueError, match="whole multiple"):
        widen_resnet(narrow, 12)
