"""benchmarks/: gpu.py's trace summary and FLOP count, the candidate formulations (conv.py's
Winograd, candidates.py's shifted kernel gradient and plain norms), on data made here (no
accelerator needed)."""
import gzip
import json
import os
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from dsno_jax import diffusion, models
from param_utils import assert_trees_close, random_params

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))
import candidates  # noqa: E402
import conv as conv_bench  # noqa: E402
import gpu  # noqa: E402
import model_throughput as mt  # noqa: E402


def write_trace(path, events, meta=None):
  meta = meta if meta is not None else [
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


def test_cpu_trace_summary_counts_ops_not_their_wrappers(tmp_path):
  path = str(tmp_path / "perfetto_trace.json.gz")
  cpu = [{"ph": "M", "pid": 3, "name": "process_name", "args": {"name": "/host:CPU"}},
         {"ph": "M", "pid": 3, "tid": 30, "name": "thread_name",
          "args": {"name": "tf_XLAEigen/123"}}]
  write_trace(path, meta=cpu, events=[
      event(3, 30, "ThunkExecutor::Execute", 9000.0),    # wraps the ops below
      event(3, 30, "ynn_fusion.7", 4000.0),
      event(3, 30, "end: ynn_fusion.7", 1.0),
      event(3, 30, "transpose_copy_fusion.3", 2000.0),
      event(3, 30, "SlinkyThreadPool::Await", 500.0),
      event(3, 30, "add_multiply_fusion", 1000.0),
      event(2, 20, "PjitFunction(step)", 99000.0),       # the python thread
  ])
  s = gpu.summarise_trace(path, steps=1)
  assert s["kernels"] == 3 and s["device_busy_ms_per_step"] == pytest.approx(7.0)
  assert s["by_kind_ms_per_step"] == pytest.approx({
      "YNNPACK fusion (convolution, matmul, reduction)": 4.0, "copy/transpose": 2.0,
      "elementwise fusion": 1.0})


def test_model_flops_match_the_compiled_count_and_grow_with_the_batch():
  """The lowered programs' FLOPs (what gpu.py reports on every backend) agree with the CPU's
  compiled count within 2%, and the step's FLOPs are affine in the batch."""
  flops = {}
  for batch in (1, 2, 3):
    prog = mt.student_programs(mt.bench_config("float32", "plain", gpu.student_config("tiny"),
                                               batch), "plain")
    flops[batch] = mt.model_flops(prog)
  prog = mt.student_programs(mt.bench_config("float32", "plain", gpu.student_config("tiny"), 2),
                             "plain")
  compiled = mt.flops_of(prog["forward"].lower(prog["params"], prog["noise"]).compile())
  assert flops[2][0] == pytest.approx(compiled, rel=0.02)
  step = [flops[b][1] for b in (1, 2, 3)]
  assert step[1] - step[0] == pytest.approx(step[2] - step[1], rel=1e-3)
  assert step[1] > step[0] > 0 and flops[1][1] > 2 * flops[1][0]  # backward costs more


@pytest.mark.parametrize("shape", [(2, 7, 5, 3, 4), (1, 8, 8, 4, 6), (3, 6, 9, 2, 2)])
def test_winograd_candidate_equals_xla_convolution(shape):
  """conv.py's Winograd F(2x2, 3x3) timings only mean something if it computes the same
  convolution: outputs and both gradients within 1e-5 relative, odd sizes included."""
  n, h, w, c, o = shape
  rng = np.random.default_rng(0)
  x = jax.numpy.asarray(rng.standard_normal((n, h, w, c)), jax.numpy.float32)
  k = jax.numpy.asarray(rng.standard_normal((3, 3, c, o)), jax.numpy.float32)
  g = jax.numpy.asarray(rng.standard_normal((n, h, w, o)), jax.numpy.float32)
  xla = lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), "SAME",
                                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))
  ref, ref_vjp = jax.vjp(xla, x, k)
  out, out_vjp = jax.vjp(conv_bench.winograd_conv, x, k)
  for a, b in zip((out,) + out_vjp(g), (ref,) + ref_vjp(g)):
    assert a.shape == b.shape
    np.testing.assert_array_less(np.max(np.abs(a - b)) / np.max(np.abs(b)), 1e-5)


def value_and_grads(fn, *args):
  """fn's output and the gradient of sum(sin(output)) with respect to every argument."""
  out = jax.jit(fn)(*args)
  grads = jax.jit(jax.grad(lambda *a: jnp.sum(jnp.sin(fn(*a))), argnums=tuple(range(len(args)))))(
      *args)
  return out, grads


@pytest.mark.parametrize("shape,features,kernel,strides,padding", [
    ((2, 8, 8, 3), 5, (3, 3), (1, 1), "SAME"),
    ((3, 9, 7, 4), 6, (3, 3), (1, 1), "SAME"),
    ((2, 8, 8, 4), 4, (3, 3), (2, 2), "SAME"),
    ((2, 9, 9, 2), 3, (3, 3), (2, 2), "SAME"),
    ((1, 6, 6, 2), 3, (1, 1), (1, 1), "VALID"),
    ((2, 7, 5, 3), 2, (3, 2), (1, 1), ((2, 0), (1, 1))),
])
def test_shifted_kernel_gradient_equals_xla(shape, features, kernel, strides, padding):
  """candidates.py's shifted kernel gradient computes XLA's (so its timings compare like with
  like), strides, odd sizes and explicit padding included."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  w = jnp.asarray(0.3 * rng.standard_normal(kernel + (shape[-1], features)), jnp.float32)
  plain = lambda x, w: candidates.conv2d(x, w, strides, padding, impl="xla")
  fast = lambda x, w: candidates.conv2d(x, w, strides, padding, impl="shifted")
  out_plain, grads_plain = value_and_grads(plain, x, w)
  out_fast, grads_fast = value_and_grads(fast, x, w)
  assert_trees_close(out_fast, out_plain)
  assert_trees_close(grads_fast, grads_plain)
  assert float(jnp.abs(grads_plain[1]).max()) > 0


def test_candidate_formulations_give_the_models_numbers():
  """The benchmark variants time the same function: a student traced under
  formulations("shifted", "plain") equals the one the package builds (TimeConvs zeroed, see
  tests/test_fast_paths.py), and the shifted convolutions do run."""
  config = tiny.get_config()
  params = random_params(models.param_shapes(models.init_student, config), 3, 0.1)
  params = flax.traverse_util.unflatten_dict({
      path: (jnp.zeros_like(v) if models.build.is_time_conv_path(path) else v)
      for path, v in flax.traverse_util.flatten_dict(params).items()})
  rng = np.random.default_rng(4)
  noise = jnp.asarray(rng.standard_normal((2, 8, 8, 1)), jnp.float32)
  labels, logsnr = jnp.array([1, 2]), jnp.asarray(diffusion.save_logsnrs(config))
  model = models.student_from_config(config)
  apply = lambda p: model.apply({"params": p}, noise, logsnr, labels, train=False)

  def candidate(p):
    with candidates.formulations("shifted", "plain"):
      return apply(p)

  assert_trees_close(value_and_grads(candidate, params), value_and_grads(apply, params))
  # the shifted kernel gradient is a custom VJP; the package's model has none
  assert "custom_vjp_call" in str(jax.make_jaxpr(candidate)(params))
  assert "custom_vjp_call" not in str(jax.make_jaxpr(apply)(params))
  with pytest.raises(ValueError, match="expected conv in"):
    with candidates.formulations("winograd"):
      pass


# --- benchmarks/torch_reference.py and benchmarks/gpu_vs_torch.py (issue 18) -----------------

def torch_reference_config():
  """configs/tiny.py with what the CIFAR-10 DSNO adds: ResnetBlock resampling, dropout,
  attention (by head_dim here) at both resolutions, three channels; class-conditional still.
  (gpu_vs_torch.py's tiny bench config, in the end-to-end test below, has conv resampling.)"""
  config = tiny.get_config()
  config.data.channels = 3
  model = config.model
  model.resblock_resample, model.num_heads, model.head_dim = True, None, 16
  model.attn_resolutions, model.dropout = (4, 8), 0.2
  return config


def test_torch_reference_with_our_parameters_computes_our_network():
  """The PyTorch DSNO of torch_reference.py, loaded with our parameters, gives our forward
  output within 1e-4 relative in float32: NCHW and channels_last, FFT and DFT TimeConv.
  (The train step's losses are compared in the end-to-end test of gpu_vs_torch.py.)"""
  torch = pytest.importorskip("torch")
  import gpu_vs_torch as gvt  # noqa: PLC0415
  import torch_reference as tr  # noqa: PLC0415
  config = torch_reference_config()
  params = gvt.comparison_params(config, seed=1)
  b, s, c = 2, config.data.image_size, config.data.channels
  rng = np.random.default_rng(5)
  logsnr = np.asarray(diffusion.save_logsnrs(config), np.float32)
  noise = rng.standard_normal((b, s, s, c)).astype(np.float32)
  labels = np.array([3, 7], np.int32)
  model = models.student_from_config(config)
  ours = np.asarray(jax.jit(lambda p: model.apply({"params": p}, noise, logsnr, labels,
                                                   train=False))(params))
  assert np.abs(ours).max() > 0.1
  for channels_last, time_conv in ((False, "fft"), (True, "dft"), (True, "fft"), (False, "dft")):
    net = tr.load_flax_params(
        tr.DSNO.from_config(config, channels_last=channels_last, time_conv=time_conv), params)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    net = net.to(memory_format=fmt).eval()
    z = torch.from_numpy(noise.copy()).permute(0, 3, 1, 2).contiguous(memory_format=fmt)
    with torch.no_grad():
      out = net(z, torch.from_numpy(logsnr.copy()), torch.from_numpy(labels.copy()))
    out = out.permute(0, 1, 3, 4, 2).numpy()
    assert out.shape == ours.shape
    assert np.abs(out - ours).max() / np.abs(ours).max() < 1e-4, (channels_last, time_conv)


def test_torch_reference_refuses_parameters_that_do_not_fit():
  """load_flax_params fills every torch parameter exactly once or raises."""
  pytest.importorskip("torch")
  import gpu_vs_torch as gvt  # noqa: PLC0415
  import torch_reference as tr  # noqa: PLC0415
  config = torch_reference_config()
  params = gvt.comparison_params(config)
  net = tr.DSNO.from_config(config)
  missing = {name: value for name, value in params.items() if name != "mid.time_conv"}
  with pytest.raises(ValueError, match="without a value"):
    tr.load_flax_params(net, missing)
  wrong = dict(params, conv_in={"kernel": np.zeros((3, 3, 2, 32), np.float32),
                                "bias": params["conv_in"]["bias"]})
  with pytest.raises(ValueError, match="conv_in/kernel"):
    tr.load_flax_params(net, wrong)


def test_gpu_vs_torch_tiny_runs_end_to_end_on_cpu(tmp_path, monkeypatch):
  """gpu_vs_torch.py --tiny on the CPU: the outputs check passes, ours and both torch eager
  layouts are timed with FLOPs and equal first losses, a failing torch.compile is reported
  rather than fatal, the Inception section compares with pytorch-fid, and the JSON holds it."""
  torch = pytest.importorskip("torch")
  pytest.importorskip("pytorch_fid")
  import gpu_vs_torch as gvt  # noqa: PLC0415

  def no_compiler(*args, **kwargs):
    raise RuntimeError("no compiler here")

  monkeypatch.setattr(torch, "compile", no_compiler)
  out = tmp_path / "gpu_vs_torch.json"
  gvt.main(["--tiny", "--configs", "bench", "--dtypes", "float32", "--torch-compile", "on",
            "--sections", "models,compile,inception", "--out", str(out)])
  with open(out) as f:
    result = json.load(f)
  assert not result["skipped"] and not result["errors"]
  assert result["env"]["jax"] == jax.__version__ and result["env"]["torch"] == torch.__version__
  assert result["matmul_tflops"]["jax_bfloat16"] > 0
  (check,) = result["checks"]
  assert check["equal"] and check["float32"]["max_rel"] < 1e-4
  rows = {r["impl"]: r for r in result["rows"]}
  compiled = "torch.compile channels_last (dft TimeConv)"
  assert set(rows) == {"ours", "torch eager NCHW", "torch eager channels_last", compiled}
  assert "no compiler here" in rows[compiled]["error"]
  for impl in ("ours", "torch eager NCHW", "torch eager channels_last"):
    row = rows[impl]
    assert row["forward_ms"] > 0 and row["step_ms"] > 0 and row["images_per_s"] > 0
    assert row["step_gflop"] > 2 * row["forward_gflop"] > 0 and row["mfu_bf16_matmul"] > 0
    assert row["first_losses"] == pytest.approx(rows["ours"]["first_losses"], rel=1e-4)
  assert rows["torch eager NCHW"]["max_rel_diff_vs_ours"] < 1e-4
  (summary,) = result["summary"]
  assert summary["config"] == "bench" and summary["step_speedup"] > 0
  assert [r["impl"] for r in result["inception"]] == [
      "ours (highest precision)", "pytorch-fid InceptionV3([3]) (TF32 off)"]
  assert all(r["images_per_s"] > 0 and r["max_rel_diff_vs_ours_highest"] < 1e-4
             for r in result["inception"])


def test_gpu_vs_torch_skips_what_the_budget_cannot_hold(tmp_path):
  """With no time budget, every job is listed as skipped and the JSON is still written."""
  pytest.importorskip("torch")
  import gpu_vs_torch as gvt  # noqa: PLC0415
  out = tmp_path / "skipped.json"
  gvt.main(["--tiny", "--budget-s", "0", "--out", str(out)])
  with open(out) as f:
    result = json.load(f)
  assert not result["rows"] and len(result["skipped"]) >= 4
  assert all("budget" in s for s in result["skipped"])
