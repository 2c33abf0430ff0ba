"""benchmarks/flops.py's device peaks tell bf16, TF32 and plain fp32 apart. (torch_compare.compare, ours
and PyTorch on the same converted weights, runs in tests/benchmarks/test_gpu_dry_run.py.)"""

import pathlib

BENCHMARKS = pathlib.Path(__file__).resolve().parents[2] / "benchmarks"


def test_peak_tflops_by_precision(monkeypatch):
  monkeypatch.syspath_prepend(str(BENCHMARKS))  # the scripts import each other by bare name
  import flops  # pylint: disable=import-outside-toplevel

  assert flops.peak_tflops("NVIDIA H200 NVL", "bfloat16") == 835.0
  assert flops.peak_tflops("NVIDIA H200", "float32", tf32=False) == 67.0
  assert flops.peak_tflops("NVIDIA H200", "float32", tf32=True) == 494.7
  assert flops.peak_tflops("NVIDIA H100 PCIe", "float32", tf32=False) == 51.0
  assert flops.peak_tflops("NVIDIA GH200 480GB", "bfloat16") == 989.4
  assert flops.peak_tflops("cpu", "float32") == 0.0
