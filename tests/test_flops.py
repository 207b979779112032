"""FLOPs counted from ONNX graphs against hand counts and torch's own counter."""

import torch
from torch import nn

from export.flops import count_flops
from export.onnx_export import export_onnx


def test_known_conv_stack_matches_hand_count(tmp_path):
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),            # out 8x16x16, MACs 8*16*16 * 3*3*3 = 55296
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),  # out 16x8x8,  MACs 16*8*8 * 8*3*3 = 73728
        nn.Conv2d(16, 16, 3, padding=1, groups=4),  # out 16x8x8, MACs 16*8*8 * 4*3*3 = 36864
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),                         # MACs 16*10 = 160
    ).eval()
    hand = 2 * (55296 + 73728 + 36864 + 160)
    report = export_onnx(model, tmp_path / "m.onnx", input_shape=(3, 16, 16))
    assert report.flops == hand
    assert report.torch_flops == hand
    assert count_flops(tmp_path / "m.onnx") == hand


def test_matmul_counted(tmp_path):
    class MM(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(6, 4))

        def forward(self, x):  # (N, 5, 6) @ (6, 4)
            return x @ self.w

    report = export_onnx(MM(), tmp_path / "mm.onnx", input_shape=(5, 6))
    assert report.flops == 2 * 5 * 6 * 4 == report.torch_flops
