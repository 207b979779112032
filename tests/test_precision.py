"""bf16 training: the same accuracy as fp32 on the synthetic data, a clean fallback, fp32 exports."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from training import precision
from training.config import OptimConfig, load_config
from training.data import DataConfig, load_dataset, split_dataset
from training.engine import fit, image_transform, predict, topk_accuracy
from training.models.resnet import ResNet, ResNetConfig

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def _train(prec: str, tmp_path) -> tuple[ResNet, float]:
    ds = load_dataset(DataConfig(kind="synthetic", image_size=32, synthetic_per_class=80,
                                 cache_dir=""))
    splits = split_dataset(ds.labels, 20, 0, seed=0)
    torch.manual_seed(0)
    model = ResNet(ResNetConfig(layers=(1, 1, 1, 1), width=16, num_classes=ds.num_classes))
    cfg = OptimConfig(epochs=6, batch_size=64, lr=0.05, precision=prec)
    x = torch.from_numpy(ds.images[splits.train])
    fit(model, lambda b, idx: (model(b), None), x, ds.labels[splits.train], cfg,
        transform=image_transform(cfg, MEAN, STD, 32), checkpoint=tmp_path / f"{prec}.pt",
        seed=0, desc=prec)
    logits = predict(model, ds.images[splits.val], mean=MEAN, std=STD)
    return model, topk_accuracy(logits, ds.labels[splits.val], 1)


@pytest.mark.skipif(not precision.cpu_has_bf16(), reason="this CPU has no bf16 kernels")
def test_bf16_trains_to_the_accuracy_of_fp32(tmp_path):
    _, fp32 = _train("fp32", tmp_path)
    model, bf16 = _train("bf16", tmp_path)
    assert fp32 > 0.5, "the fixture must learn something for the comparison to mean anything"
    assert abs(bf16 - fp32) <= 0.1, (fp32, bf16)
    # Handed back as ordinary fp32 contiguous weights: what export and evaluation expect.
    for p in model.parameters():
        assert p.dtype == torch.float32 and p.is_contiguous()


def test_bf16_runs_convs_in_bf16_on_channels_last():
    if not precision.cpu_has_bf16():
        pytest.skip("this CPU has no bf16 kernels")
    conv = torch.nn.Conv2d(3, 8, 3)
    precision.prepare(conv, "bf16")
    x = precision.layout(torch.randn(2, 3, 8, 8), "bf16")
    with precision.autocast("bf16"):
        y = conv(x)
    assert y.dtype == torch.bfloat16
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert conv.weight.dtype == torch.float32  # master weights stay fp32


def test_bf16_falls_back_to_fp32_with_a_log_line(monkeypatch, caplog):
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: False)
    with caplog.at_level(logging.WARNING):
        assert precision.resolve("bf16") == "fp32"
    assert "no bf16 kernels" in caplog.text
    assert precision.resolve("fp32") == "fp32"


def test_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="precision must be one of"):
        OptimConfig(precision="fp16")
    with pytest.raises(ValueError, match="precision must be one of"):
        load_config(None, ["original.precision=int8"])


def test_a_bf16_run_killed_mid_way_resumes_to_the_same_weights(tmp_path):
    """Killed in epoch 2 and restarted, a bf16 run ends exactly where an unbroken run ends."""
    ds = load_dataset(DataConfig(kind="synthetic", image_size=16, synthetic_per_class=20,
                                 cache_dir=""))
    x, y = torch.from_numpy(ds.images), ds.labels
    cfg = OptimConfig(epochs=3, batch_size=32, lr=0.05, precision="bf16")
    plain = image_transform(cfg, MEAN, STD, 16)

    def new_model() -> ResNet:
        torch.manual_seed(0)
        return ResNet(ResNetConfig(layers=(1, 1), width=8, num_classes=ds.num_classes,
                                   input_size=16))

    def train(model: ResNet, ckpt, transform=plain) -> ResNet:
        return fit(model, lambda b, i: (model(b), None), x, y, cfg, transform=transform,
                   checkpoint=ckpt, seed=0, desc="resume")

    whole = train(new_model(), tmp_path / "whole.pt")

    def killed_in_epoch_2(batch, gen, epoch):
        if epoch == 1:
            raise KeyboardInterrupt
        return plain(batch, gen, epoch)

    with pytest.raises(KeyboardInterrupt):
        train(new_model(), tmp_path / "resumed.pt", killed_in_epoch_2)
    assert torch.load(tmp_path / "resumed.pt", weights_only=False)["epoch"] == 1
    resumed = train(new_model(), tmp_path / "resumed.pt")
    for a, b in zip(whole.state_dict().values(), resumed.state_dict().values(), strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
