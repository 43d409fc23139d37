"""benchmarks/: digits_seeds.py's table over seeds, the PyTorch reference network and
gpu_vs_torch.py end to end, on data made here (no accelerator needed)."""
import json
import os
import sys

import jax
import numpy as np
import pytest

from configs import tiny
from dsno_jax import diffusion, models

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))
import digits_seeds  # noqa: E402


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


def write_results(root, seed, rows, metric="FD-digits"):
  path = root / f"seed_{seed}" / "eval"
  path.mkdir(parents=True)
  (path / "results.json").write_text(json.dumps({"metric": metric, "rows": rows}))


def test_digits_seeds_tables_each_rows_mean_and_std_over_seeds(tmp_path, capsys):
  """Three fake results.json files: each (model, solver, NFE) row gets its mean and sample standard
  deviation over the seeds, a row missing from a seed says how many seeds it has, and the JSON
  and markdown are written."""
  metric = {0: 2.5, 1: 2.3, 2: 2.2}
  for seed in (0, 1, 2):
    rows = [{"model": "DSNO", "solver": "one step", "nfe": 1, "metric": metric[seed],
             "class_accuracy": 0.97 + 0.01 * seed, "near_copies": 0.0,
             "pixel_near_copies": 0.01 * seed, "nn_ratio_copies": 0.0},
            {"model": "teacher", "solver": "dopri5 (tol 0.0001)", "nfe": 180.0 + seed,
             "adaptive": True, "metric": 2.0 + seed, "class_accuracy": 0.97}]
    rows += [{"model": "teacher", "solver": "ddim", "nfe": nfe, "metric": 10.0 / nfe + seed}
             for nfe in (2, 8)]
    if seed != 1:
      rows.append({"model": "DSNO refined", "solver": "one step", "nfe": 1, "metric": 2.0})
    write_results(tmp_path, seed, rows)
  out = tmp_path / "summary"
  summary = digits_seeds.main(["--root", str(tmp_path), "--seeds", "0", "1", "2",
                               "--table-only", "--out", str(out)])
  dsno, teacher, ddim2, ddim8, refined = summary
  assert (dsno["model"], refined["model"], refined["seeds"]) == ("DSNO", "DSNO refined", [0, 2])
  assert dsno["columns"]["metric"]["mean"] == pytest.approx(np.mean([2.5, 2.3, 2.2]))
  assert dsno["columns"]["metric"]["std"] == pytest.approx(np.std([2.5, 2.3, 2.2], ddof=1))
  assert teacher["columns"]["nfe"]["mean"] == pytest.approx(181.0)
  assert [r["columns"]["metric"]["mean"] for r in (ddim2, ddim8)] == pytest.approx([6.0, 2.25])
  table = capsys.readouterr().out
  assert "| DSNO | one step | 1 | 2.333 ± 0.153 | 0.980 ± 0.010 |" in table
  assert "| DSNO refined (2 seeds) | one step | 1 | 2.000 ± 0.000 |" in table
  assert "| teacher | dopri5 (tol 0.0001) | 181.0 ± 1.0 (mean) | 3.000 ± 1.000 |" in table
  assert "1.00% ± 1.00%" in table  # pixel near copies, as percentages
  assert (tmp_path / "summary.md").read_text().strip() == table.strip()
  saved = json.loads((tmp_path / "summary.json").read_text())
  assert saved["seeds"] == [0, 1, 2] and set(saved["results"]) == {"0", "1", "2"}
  with pytest.raises(SystemExit, match="seed_3/eval/results.json does not exist"):
    digits_seeds.main(["--root", str(tmp_path), "--seeds", "3", "--table-only",
                       "--out", str(out)])
