"""benchmarks/gpu.py's trace summary and FLOP count, on data made here (no accelerator needed)."""
import gzip
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))
import gpu  # noqa: E402
import model_throughput as mt  # noqa: E402


def write_trace(path, events):
  meta = [
      {"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/device:GPU:0"}},
      {"ph": "M", "pid": 1, "tid": 10, "name": "thread_name",
       "args": {"name": "Stream #14(Compute)"}},
      {"ph": "M", "pid": 1, "tid": 11, "name": "thread_name", "args": {"name": "XLA Ops"}},
      {"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "/host:CPU"}},
      {"ph": "M", "pid": 2, "tid": 20, "name": "thread_name", "args": {"name": "python"}},
  ]
  with gzip.open(path, "wt") as f:
    json.dump({"traceEvents": meta + events}, f)


def event(pid, tid, name, dur_us):
  return {"ph": "X", "pid": pid, "tid": tid, "name": name, "ts": 0, "dur": dur_us}


def test_trace_summary_counts_stream_kernels_only(tmp_path):
  path = str(tmp_path / "perfetto_trace.json.gz")
  write_trace(path, [
      event(1, 10, "sm90_xmma_wgrad_implicit_gemm_f32", 3000.0),   # convolution, 3 ms
      event(1, 10, "sm90_xmma_gemm_f32f32_tf32", 1000.0),          # matmul
      event(1, 10, "loop_convert_fusion", 500.0),                  # not a convolution
      event(1, 10, "input_reduce_fusion_2", 250.0),
      event(1, 10, "sm90_xmma_wgrad_implicit_gemm_f32", 3000.0),   # same kernel again
      event(1, 11, "fusion.12", 99000.0),    # derived 'XLA Ops' line: repeats the kernels
      event(2, 20, "PjitFunction(step)", 99000.0),                 # host
  ])
  s = gpu.summarise_trace(path, steps=2)
  assert s["tracks"] == ["/device:GPU:0 / Stream #14(Compute)"]
  assert s["kernels"] == 4
  assert s["device_busy_ms_per_step"] == pytest.approx((6000 + 1000 + 500 + 250) / 1e3 / 2)
  assert s["by_kind_ms_per_step"] == pytest.approx(
      {"convolution": 3.0, "matmul": 0.5, "elementwise fusion": 0.25, "reduction": 0.125})
  assert s["top_kernels_ms_per_step"][0] == ("sm90_xmma_wgrad_implicit_gemm_f32", 3.0)


def test_model_flops_match_the_compiled_count_and_grow_with_the_batch():
  """The lowered programs' FLOPs (what gpu.py reports on every backend) agree with the CPU's
  compiled count within 2%, and the step's FLOPs are affine in the batch."""
  flops = {}
  for batch in (1, 2, 3):
    prog = mt.student_programs(mt.bench_config("float32", "plain", gpu.student_config("tiny"),
                                               batch))
    flops[batch] = mt.model_flops(prog)
  prog = mt.student_programs(mt.bench_config("float32", "plain", gpu.student_config("tiny"), 2))
  compiled = mt.flops_of(prog["forward"].lower(prog["params"], prog["noise"]).compile())
  assert flops[2][0] == pytest.approx(compiled, rel=0.02)
  step = [flops[b][1] for b in (1, 2, 3)]
  assert step[1] - step[0] == pytest.approx(step[2] - step[1], rel=1e-3)
  assert step[1] > step[0] > 0 and flops[1][1] > 2 * flops[1][0]  # backward costs more
