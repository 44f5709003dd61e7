"""TensorRT engines from finished ONNX graphs: strongly typed plans, their layer information, CUDA-event timing.

Written against TensorRT 10's documented Python API (and valid on 11, where strong typing is the only mode).
One module per job:
- `library`: the only import of `tensorrt`, CUDA availability, the one process-wide logger;
- `build`: builder settings per precision, the graph checks, parse + configure + build a serialized plan;
- `cache`: the timing cache (keyed by GPU, compute capability, TensorRT and CUDA versions) and plan files;
- `inspect`: IEngineInspector's JSON -> layers by precision, reformat copies, int8 layers that are not int8;
- `runtime`: deserialize, bind device buffers, run, time with CUDA events or CUDA graphs;
- `backend`: TensorRTBackend, the registry's entry point.
"""

from dfp_deploy.backends.tensorrt.backend import TensorRTBackend
from dfp_deploy.backends.tensorrt.build import (DEFAULT_OPT_LEVEL, OPT_LEVELS, PreparedOnnx, build_plan,
                                                builder_settings, check_graph_precision, int8_expected_nodes,
                                                prepare_onnx, static_input_shapes)
from dfp_deploy.backends.tensorrt.cache import (default_cache_dir, load_timing_cache, save_timing_cache,
                                                timing_cache_key, timing_cache_path)
from dfp_deploy.backends.tensorrt.inspect import LayerInfo, format_precision, parse_layer_info, summarize_layers
from dfp_deploy.backends.tensorrt.library import NO_GPU, NOT_INSTALLED
from dfp_deploy.backends.tensorrt.runtime import NAME, TensorRTEngine

__all__ = ["DEFAULT_OPT_LEVEL", "NAME", "NOT_INSTALLED", "NO_GPU", "OPT_LEVELS", "LayerInfo", "PreparedOnnx",
           "TensorRTBackend", "TensorRTEngine", "build_plan", "builder_settings", "check_graph_precision",
           "default_cache_dir", "format_precision", "int8_expected_nodes", "load_timing_cache", "parse_layer_info",
           "prepare_onnx", "save_timing_cache", "static_input_shapes", "summarize_layers", "timing_cache_key",
           "timing_cache_path"]
