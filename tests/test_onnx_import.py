"""Importing an exported original.onnx back into a trainable ResNet (BN folded → BN restored)."""

import numpy as np
import pytest
import torch

from export.onnx_export import export_onnx
from training.engine import OptimConfig, loss_fn
from training.models.resnet import ResNet, ResNetConfig
from training.onnx_import import import_original, ort_max_difference

CFG = ResNetConfig(layers=(1, 1, 1), width=8, stem_stride=2, num_classes=7, input_size=32)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    model = ResNet(CFG)
    model.train()
    with torch.no_grad():  # non-trivial BN statistics, so the folding is real
        for _ in range(3):
            model(torch.randn(16, 3, 32, 32) * 2 + 0.5)
    model.eval()
    path = tmp_path_factory.mktemp("import") / "original.onnx"
    export_onnx(model, path, input_shape=(3, 32, 32))
    return model, path


def test_import_reproduces_the_graph_and_restores_batchnorm(exported):
    model, path = exported
    data = [torch.randn(32, 3, 32, 32) * 2 + 0.5 for _ in range(4)]
    imported = import_original(path, CFG, data)
    x = torch.randn(8, 3, 32, 32)
    assert ort_max_difference(imported, path, [x.numpy()]) < 1e-4
    with torch.no_grad():
        np.testing.assert_allclose(imported(x), model(x), atol=1e-4)
    # BN is back with the measured statistics: train-mode BN on the same kind of data behaves
    # nearly like eval mode, so fine-tuning starts from the original's function.
    bn = imported.stem[0][1]
    assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))
    imported.train()
    with torch.no_grad():
        train_out = imported(torch.cat(data))
    imported.eval()
    with torch.no_grad():
        eval_out = imported(torch.cat(data))
    assert (train_out.argmax(1) == eval_out.argmax(1)).float().mean() > 0.9


def test_import_rejects_a_config_that_does_not_match(exported):
    _, path = exported
    with pytest.raises(ValueError, match="same architecture|config expects"):
        import_original(path, ResNetConfig(layers=(1, 1, 1), width=16, stem_stride=2,
                                           num_classes=7, input_size=32), [torch.randn(2, 3, 32, 32)])
    with pytest.raises(ValueError, match="same architecture"):
        import_original(path, ResNetConfig(layers=(2, 1, 1), width=8, stem_stride=2,
                                           num_classes=7, input_size=32), [torch.randn(2, 3, 32, 32)])


def test_logit_match_pins_the_logits_not_just_their_softmax():
    """KL is blind to a shift of all logits; the logit_match term is not."""
    teacher = torch.tensor([[2.0, 0.0, -1.0]])
    shifted = teacher + 5.0
    labels = torch.tensor([0])
    kl_only = OptimConfig(distill=1.0, temperature=2.0, label_smoothing=0.0)
    pinned = OptimConfig(distill=1.0, temperature=2.0, label_smoothing=0.0, logit_match=0.1)
    assert loss_fn(shifted, labels, teacher, kl_only) == pytest.approx(float(loss_fn(teacher, labels, teacher, kl_only)), abs=1e-6)
    assert float(loss_fn(shifted, labels, teacher, pinned)) == pytest.approx(2.5, abs=1e-5)
    assert float(loss_fn(teacher, labels, teacher, pinned)) == pytest.approx(0.0, abs=1e-6)


def test_ignored_labels_learn_from_the_teacher_only():
    """A head's negatives (label IGNORE) add no cross-entropy; a batch of only negatives still
    gives a finite loss from the teacher terms."""
    from training.engine import IGNORE

    cfg = OptimConfig(distill=0.5, temperature=2.0, label_smoothing=0.0, logit_match=0.1)
    teacher = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
    student = torch.tensor([[1.0, 0.5, -1.0], [0.5, 0.5, 0.0]])
    mixed = loss_fn(student, torch.tensor([0, IGNORE]), teacher, cfg)
    only_first = loss_fn(student[:1], torch.tensor([0]), teacher[:1], cfg)
    negatives = loss_fn(student, torch.tensor([IGNORE, IGNORE]), teacher, cfg)
    assert torch.isfinite(negatives) and float(negatives) > 0
    # The mixed batch's CE is the first sample's alone (mean over labelled samples only).
    ce_first = torch.nn.functional.cross_entropy(student[:1], torch.tensor([0]))
    kd_mse = loss_fn(student, torch.tensor([IGNORE, IGNORE]), teacher, cfg)
    assert float(mixed) == pytest.approx(0.5 * float(ce_first) + float(kd_mse), rel=1e-5)
    assert float(only_first) != pytest.approx(float(mixed))


def test_import_reads_weights_stored_as_float16(exported, tmp_path):
    """A package written with package.weights = "fp16" (weights behind Casts) imports too, with
    its width read from the graph, and matches that graph."""
    import shutil

    from export.storage import store_float16
    from training.onnx_import import onnx_stem_width

    _, path = exported
    half = tmp_path / "original-fp16.onnx"
    shutil.copyfile(path, half)
    store_float16(half)
    assert onnx_stem_width(half) == onnx_stem_width(path) == CFG.width
    imported = import_original(half, CFG, [torch.randn(32, 3, 32, 32) * 2 + 0.5])
    assert ort_max_difference(imported, half, [torch.randn(4, 3, 32, 32).numpy()]) < 1e-4
