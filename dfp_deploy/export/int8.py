"""The int8 Q/DQ ONNX of a PyTorch model: activation ranges (data-free from BN statistics, or calibrated) + passes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from dfp_deploy.core.types import Preprocess


def input_range(preprocess: Preprocess) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel (lo, hi) of the normalised input: pixels 0..255 through (x - mean) / std."""
    lo = tuple((0.0 - m) / s for m, s in zip(preprocess.mean, preprocess.std))
    hi = tuple((255.0 - m) / s for m, s in zip(preprocess.mean, preprocess.std))
    return lo, hi


def has_dynamic_batch(onnx_path: Path) -> bool:
    """True when the first input's batch dimension of the ONNX file is symbolic (or unknown), False when fixed."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    return not (dims and dims[0].HasField("dim_value"))


def int8_onnx(model: nn.Module, example: torch.Tensor, fp32_onnx: Path, out_path: Path, *, style: str,
              preprocess: Preprocess, calibration_inputs: np.ndarray | None = None, range_k: float = 6.0,
              opset: int = 18, threads: int | None = None, export_cache: Path | None = None) -> Path:
    """Write the Q/DQ model of `fp32_onnx` (exported from `model`) for `style` ("ort-cpu" | "tensorrt") to out_path.

    With calibration_inputs, activation ranges are min/max over them (ORT runs the fp32 graph); without, they come
    from BatchNorm statistics (export/ranges.py), read from a second export that keeps the BN nodes and is deleted
    afterwards. The BN statistics reach the fp32 graph by tensor name (a folded Conv's output keeps its BN's
    name), so that export must trace the model exactly as the fp32 one did: a dynamic batch adds symbolic-size
    nodes that shift the exporter's name counters (a static export names a residual sum `add`, a dynamic one
    `add_130`), so the BN-kept copy takes the fp32 file's batch mode. Tensors the exporter's optimizer renamed
    (Split outputs) are recomputed on the fp32 graph itself (`data_free_ranges(..., target=)`). With
    `export_cache` (the folder the fp32 graph was exported with) the BN-kept copy is that export's template.
    """
    from dfp_deploy.export.onnx_export import export_onnx
    from dfp_deploy.export.passes.prepare import prepare_int8_onnx
    from dfp_deploy.export.calibrated_ranges import calibration_ranges
    from dfp_deploy.export.ranges import data_free_ranges

    out_path = Path(out_path)
    if calibration_inputs is not None:
        ranges = calibration_ranges(fp32_onnx, calibration_inputs, threads=threads)
    else:
        bn_kept = out_path.parent / f".{out_path.stem}.bn_kept.onnx"
        try:
            export_onnx(model, example, bn_kept, dynamic_batch=has_dynamic_batch(fp32_onnx), opset=opset,
                        optimize=False, cache=export_cache)
            ranges = data_free_ranges(bn_kept, input_range(preprocess), k=range_k, target=fp32_onnx)
        finally:
            bn_kept.unlink(missing_ok=True)
    return prepare_int8_onnx(fp32_onnx, out_path, style=style, ranges=ranges)
