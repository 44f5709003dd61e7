"""Machine facts that change what the pipeline builds: the CPU's conv channel block and the default rounding."""

import pytest

from dfp_deploy.core import env
from dfp_deploy.pipeline import default_round_to

AVX2 = "processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu sse2 avx avx2 fma\n"
AVX512 = AVX2.replace("avx2 fma", "avx2 fma avx512f avx512bw")


@pytest.mark.parametrize("cpuinfo, block", [(AVX2, 8), (AVX512, 16), ("", 8)])
def test_cpu_channel_block_follows_the_vector_width(monkeypatch, cpuinfo, block):
    monkeypatch.setattr(env, "_cpuinfo", lambda: cpuinfo)
    assert env.cpu_channel_block() == block
    assert default_round_to("ort-cpu", "fp32") == block
    assert default_round_to("torch-cpu", "int8") == block


def test_gpu_targets_round_for_tensor_cores(monkeypatch):
    monkeypatch.setattr(env, "_cpuinfo", lambda: AVX512)  # the host CPU does not matter for a GPU target
    assert default_round_to("tensorrt", "int8") == 32
    assert default_round_to("tensorrt", "fp16") == 8
    assert default_round_to("torch-cuda", "fp32") == 8
