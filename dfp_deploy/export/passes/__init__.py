"""ONNX graph passes (BN folding, cleanup, Q/DQ insertion per target, Q/DQ validation), each returning (model, changed).

Heavy imports (onnx-graphsurgeon, onnxruntime) happen inside the passes, so importing this package is cheap.
"""

from dfp_deploy.export.passes.cleanup import pass_cleanup
from dfp_deploy.export.passes.fold_bn import pass_fold_bn
from dfp_deploy.export.passes.prepare import prepare_int8_onnx, quantize_model
from dfp_deploy.export.passes.qdq import pass_insert_qdq
from dfp_deploy.export.passes.qdq_placement import STYLES
from dfp_deploy.export.passes.validate_qdq import pass_validate_qdq, qdq_problems

__all__ = ["STYLES", "pass_cleanup", "pass_fold_bn", "pass_insert_qdq", "pass_validate_qdq", "prepare_int8_onnx",
           "qdq_problems", "quantize_model"]
