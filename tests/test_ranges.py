"""Data-free activation ranges on the families the project supports: inverted residuals, non-ReLU activations,
squeeze-excitation gates, and the moments each nonlinearity's rule rests on (docs/methods/data_free_ranges.md)."""

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from dfp_deploy.core.types import Preprocess
from dfp_deploy.export.int8 import has_dynamic_batch, int8_onnx
from dfp_deploy.export.onnx_export import export_onnx

PRE = Preprocess(size=16, mean=(127.0, 127.0, 127.0), std=(128.0, 128.0, 128.0))


class InvertedResidual(nn.Module):
    """expand 1x1 -> BN -> act -> depthwise 3x3 -> BN -> act -> [SE] -> project 1x1 -> BN, plus the identity."""

    def __init__(self, channels: int, act: type[nn.Module], se: bool = False):
        super().__init__()
        wide = channels * 4
        self.expand = nn.Sequential(nn.Conv2d(channels, wide, 1, bias=False), nn.BatchNorm2d(wide), act())
        self.depthwise = nn.Sequential(nn.Conv2d(wide, wide, 3, padding=1, groups=wide, bias=False),
                                       nn.BatchNorm2d(wide), act())
        self.se = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(wide, 4, 1), act(), nn.Conv2d(4, wide, 1),
                                nn.Sigmoid()) if se else None
        self.project = nn.Sequential(nn.Conv2d(wide, channels, 1, bias=False), nn.BatchNorm2d(channels))

    def forward(self, x):
        y = self.depthwise(self.expand(x))
        if self.se is not None:
            y = y * self.se(y)
        return x + self.project(y)


class TinyMobileNet(nn.Module):
    """Stem, two inverted-residual blocks, head conv, pool, linear: the EfficientNet/MobileNet pattern in small."""

    def __init__(self, act: type[nn.Module] = nn.ReLU6, se: bool = False):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8), act())
        self.blocks = nn.Sequential(InvertedResidual(8, act, se), InvertedResidual(8, act, se))
        self.head = nn.Sequential(nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16), act())
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.head(self.blocks(self.stem(x)))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def _non_degenerate(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BN statistics and affine parameters, so that activations have unit scale and every channel differs."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data = torch.rand(m.num_features, generator=gen) + 0.5
            m.bias.data = torch.randn(m.num_features, generator=gen) * 0.5
            m.running_mean = torch.randn(m.num_features, generator=gen) * 0.2
            m.running_var = torch.rand(m.num_features, generator=gen) + 0.5
    return model.eval()


def _model(act=nn.ReLU6, se=False) -> nn.Module:
    torch.manual_seed(0)
    return _non_degenerate(TinyMobileNet(act, se))


def _images(n: int = 32) -> np.ndarray:
    pixels = np.random.default_rng(0).integers(0, 256, size=(n, 3, 16, 16)).astype(np.float32)
    return (pixels - 127.0) / 128.0


def _run(path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    batch = session.get_inputs()[0].shape[0]
    step = batch if isinstance(batch, int) else len(x)
    return np.concatenate([session.run(None, {"input": x[i:i + step]})[0] for i in range(0, len(x), step)])


@pytest.mark.parametrize("dynamic_batch", [False, True])
def test_inverted_residual_int8_builds_data_free_with_either_batch_mode(tmp_path, dynamic_batch):
    # a static-batch export names the residual sums add, add_1, ...; a dynamic one add_130, ...: the BN-kept copy
    # the ranges come from must be exported the same way, or the sums get no range
    model = _model()
    example = torch.zeros(2, 3, 16, 16)
    fp32 = export_onnx(model, example, tmp_path / "fp32.onnx", dynamic_batch=dynamic_batch).path
    assert has_dynamic_batch(fp32) == dynamic_batch
    out = int8_onnx(model, example, fp32, tmp_path / "int8.onnx", style="ort-cpu", preprocess=PRE)
    x = _images()
    reference, quantized = _run(fp32, x), _run(out, x)
    assert np.abs(quantized - reference).max() < 0.1 * np.abs(reference).max()
    assert not list(tmp_path.glob(".*bn_kept*"))
