"""Same-machine PyTorch (CPU) reference of the DSNO student on the bench configuration.

The DSNO network of dsno_jax/models (unet.py, blocks.py, time_conv.py) re-written in
PyTorch for this repo, in NCHW layout, so our JAX timings (benchmarks/model_throughput.py)
can be compared with an eager PyTorch run on the same machine. It is not the paper authors'
code. Settings come from configs/bench.py (32x32x3, ch 64, ch_mult (1, 2, 2), K = 4, batch
8); the parameter count is checked against our Flax student (asserted equal). Weights are
random (torch defaults; no zero-init), as only speed is measured. Attention uses
F.scaled_dot_product_attention.

Timed, after `--warmup` calls, as the median of `--repeats`: a no-grad forward of noise
(B, C, H, W) at the K save log-SNRs -> (B, K, C, H, W); a train step (forward, MSE to random
targets, backward, torch.optim.Adam step). Prints a markdown table; writes JSON to --out.

  python benchmarks/torch_reference.py [--threads 2] [--repeats 5]
      [--out benchmarks/results/torch_reference.json]
"""
import argparse
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

LOGSNR_INPUTS = {
    "inv_cos": lambda l, lo, hi: torch.atan(torch.exp(-0.5 * l.clamp(-20, 20))) / (0.5 * math.pi),
    "linear": lambda l, lo, hi: (l - lo) / (hi - lo),
    "sigmoid": lambda l, lo, hi: torch.sigmoid(l),
}


def group_norm(c):
  return nn.GroupNorm(32, c, eps=1e-6)


def conv3(c_in, c_out):
  return nn.Conv2d(c_in, c_out, 3, padding=1)


def sinusoidal_embedding(s, dim):
  """(N,) -> (N, dim): [sin, cos] of 1000*s at frequencies exp(-log(1e4) i/(half-1))."""
  half = dim // 2
  freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / (half - 1))
  angles = 1000.0 * s[:, None] * freqs[None]
  return F.pad(torch.cat([angles.sin(), angles.cos()], dim=1), (0, dim % 2))


class ResnetBlock(nn.Module):
  """GroupNorm-swish-conv, FiLM (scale, shift) from emb, GroupNorm-swish-conv, residual."""

  def __init__(self, c_in, c_out, emb_ch):
    super().__init__()
    self.norm1, self.conv1 = group_norm(c_in), conv3(c_in, c_out)
    self.temb_proj = nn.Linear(emb_ch, 2 * c_out)
    self.norm2, self.conv2 = group_norm(c_out), conv3(c_out, c_out)
    self.nin_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

  def forward(self, x, emb):
    h = self.conv1(F.silu(self.norm1(x)))
    scale, shift = self.temb_proj(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
    h = self.conv2(F.silu(self.norm2(h) * (1 + scale) + shift))  # dropout 0: omitted
    return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
  """Multi-head self-attention over the H*W positions of each frame, residual."""

  def __init__(self, c, num_heads):
    super().__init__()
    self.norm, self.heads = group_norm(c), num_heads
    self.q, self.k, self.v, self.proj_out = (nn.Linear(c, c) for _ in range(4))

  def forward(self, x):
    n, c, hgt, wid = x.shape
    h = self.norm(x).flatten(2).transpose(1, 2)  # (N, HW, C)
    q, k, v = (f(h).view(n, hgt * wid, self.heads, -1).transpose(1, 2)
               for f in (self.q, self.k, self.v))
    h = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, hgt * wid, c)
    return x + self.proj_out(h).transpose(1, 2).reshape(x.shape)


class TimeConv(nn.Module):
  """h + leaky_relu(irfft(W * rfft(h)[:modes])) along the K frames of each example."""

  def __init__(self, c, num_modes):
    super().__init__()
    self.modes = num_modes
    self.weight_real = nn.Parameter(torch.rand(c, c, num_modes) / (c * c))
    self.weight_imag = nn.Parameter(torch.rand(c, c, num_modes) / (c * c))

  def forward(self, h, k):  # h: (B*K, C, H, W), frames of one example adjacent
    x = h.view(-1, k, *h.shape[1:])
    spectrum = torch.fft.rfft(x, dim=1)  # (B, K//2+1, C, H, W)
    used = min(self.modes, spectrum.shape[1])
    w = torch.complex(self.weight_real, self.weight_imag)[..., :used]
    y = torch.einsum("bfihw,iof->bfohw", spectrum[:, :used], w)
    update = torch.fft.irfft(y, n=k, dim=1)  # frequencies >= used are zero-padded
    return (x + F.leaky_relu(update, 0.01)).view(h.shape)


class Downsample(nn.Module):
  """Stride-2 3x3 conv with SAME padding as in XLA: pad 0 before, 1 after."""

  def __init__(self, c):
    super().__init__()
    self.conv = nn.Conv2d(c, c, 3, stride=2)

  def forward(self, x):
    return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
  def __init__(self, c):
    super().__init__()
    self.conv = conv3(c, c)

  def forward(self, x):
    return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class DSNO(nn.Module):
  """noise (B, C, H, W), logsnr (K,) -> (B, K, C, H, W); unconditional, conv resampling."""

  def __init__(self, model, image_size, channels):
    super().__init__()
    assert not model.resblock_resample and model.head_dim is None, "bench settings only"
    self.ch, self.nrb = model.ch, model.num_res_blocks
    self.logsnr_input_type = model.logsnr_input_type
    block = lambda c_in, c_out: ResnetBlock(c_in, c_out, model.emb_ch)
    self.dense0 = nn.Linear(model.ch, model.emb_ch)
    self.dense1 = nn.Linear(model.emb_ch, model.emb_ch)
    self.conv_in = conv3(channels, model.ch)
    c, skip_chs, res = model.ch, [model.ch], image_size
    self.down = nn.ModuleList()
    for i, mult in enumerate(model.ch_mult):
      level = nn.ModuleDict()
      for j in range(model.num_res_blocks):
        level[f"block_{j}"], c = block(c, model.ch * mult), model.ch * mult
        if res in model.attn_resolutions:
          level[f"attn_{j}"] = AttnBlock(c, model.num_heads)
        level[f"time_conv_{j}"] = TimeConv(c, model.num_modes)
        skip_chs.append(c)
      if i != len(model.ch_mult) - 1:
        level["downsample"], res = Downsample(c), res // 2
        skip_chs.append(c)
      self.down.append(level)
    self.mid = nn.ModuleDict(dict(block_1=block(c, c), attn_1=AttnBlock(c, model.num_heads),
                                  time_conv=TimeConv(c, model.num_modes), block_2=block(c, c)))
    self.up = nn.ModuleList()
    for i, mult in reversed(list(enumerate(model.ch_mult))):
      level = nn.ModuleDict()
      for j in range(model.num_res_blocks + 1):
        level[f"block_{j}"], c = block(c + skip_chs.pop(), model.ch * mult), model.ch * mult
        if res in model.attn_resolutions:
          level[f"attn_{j}"] = AttnBlock(c, model.num_heads)
        level[f"time_conv_{j}"] = TimeConv(c, model.num_modes)
      if i != 0:
        level["upsample"], res = Upsample(c), res * 2
      self.up.append(level)  # self.up[0] is the lowest resolution
    assert not skip_chs
    self.norm_out, self.conv_out = group_norm(c), conv3(c, channels)

  def time_embedding(self, logsnr):
    s = LOGSNR_INPUTS[self.logsnr_input_type](logsnr.float(), -10.0, 10.0)
    return self.dense1(F.silu(self.dense0(sinusoidal_embedding(s, self.ch))))

  @staticmethod
  def _level(level, h, emb, j, k):
    h = level[f"block_{j}"](h, emb)
    if f"attn_{j}" in level:
      h = level[f"attn_{j}"](h)
    return level[f"time_conv_{j}"](h, k)

  def forward(self, noise, logsnr):
    b, k = noise.shape[0], logsnr.shape[0]
    emb = self.time_embedding(logsnr)[None].expand(b, k, -1).reshape(b * k, -1)
    h = self.conv_in(noise)  # once, then K copies folded into the batch (example-major)
    h = h[:, None].expand(b, k, *h.shape[1:]).reshape(b * k, *h.shape[1:])
    skips = [h]
    for level in self.down:
      for j in range(self.nrb):
        skips.append(self._level(level, skips[-1], emb, j, k))
      if "downsample" in level:
        skips.append(level["downsample"](skips[-1]))
    h = self.mid["attn_1"](self.mid["block_1"](skips[-1], emb))
    h = self.mid["block_2"](self.mid["time_conv"](h, k), emb)
    for level in self.up:
      for j in range(self.nrb + 1):
        h = self._level(level, torch.cat([h, skips.pop()], dim=1), emb, j, k)
      if "upsample" in level:
        h = level["upsample"](h)
    out = self.conv_out(F.silu(self.norm_out(h)))
    return out.view(b, k, *out.shape[1:])


def jax_student_params(config) -> int:
  from dsno_jax import models
  return models.count_params(models.param_shapes(models.init_student, config))


def median_time(fn, warmup, repeats):
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times), times


def run(args):
  from configs import bench
  from dsno_jax import diffusion
  config = bench.get_config()
  ours = jax_student_params(config)  # before timing: JAX stays idle afterwards
  torch.manual_seed(0)
  torch.set_num_threads(args.threads)
  b, s, c = config.train.batch_size, config.data.image_size, config.data.channels
  logsnr = torch.tensor(diffusion.save_logsnrs(config))
  k = logsnr.shape[0]
  model = DSNO(config.model, s, c)
  params = sum(p.numel() for p in model.parameters())
  assert params == ours, f"torch model has {params:,} parameters, our Flax student {ours:,}"
  noise, targets = torch.randn(b, c, s, s), torch.randn(b, k, c, s, s)
  opt = torch.optim.Adam(model.parameters(), lr=config.train.learning_rate)

  def forward():
    with torch.no_grad():
      out = model(noise, logsnr)
    assert out.shape == (b, k, c, s, s), out.shape

  def train_step():
    opt.zero_grad(set_to_none=True)
    loss = F.mse_loss(model(noise, logsnr), targets)
    loss.backward()
    opt.step()

  model.eval()
  fwd, fwd_times = median_time(forward, args.warmup, args.repeats)
  model.train()
  step, step_times = median_time(train_step, args.warmup, args.repeats)
  return dict(impl="torch", torch_version=torch.__version__, threads=args.threads,
              forward_s=fwd, train_step_s=step, params=params, jax_student_params=ours,
              batch=b, num_times=k, image_size=s, warmup=args.warmup, repeats=args.repeats,
              forward_times_s=fwd_times, train_step_times_s=step_times)


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--out",
                      default=os.path.join("benchmarks", "results", "torch_reference.json"))
  args = parser.parse_args()
  r = run(args)
  print("| impl | threads | forward s | train step s | params |")
  print("|---|---|---|---|---|")
  print(f"| torch {r['torch_version']} (CPU, NCHW) | {r['threads']} | {r['forward_s']:.3f} | "
        f"{r['train_step_s']:.3f} | {r['params']:,} |")
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(r, f, indent=1)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
