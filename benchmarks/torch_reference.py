"""PyTorch re-implementation of the DSNO student of dsno_jax/models, for same-machine comparisons.

The DSNO network of dsno_jax/models (unet.py, blocks.py, time_conv.py) re-written in PyTorch
for this repo, in NCHW layout (or channels_last memory format), so our JAX timings can be
compared with PyTorch running the same network on the same machine. It is not the paper
authors' code. It builds any config's student (`DSNO.from_config`): conv or ResnetBlock
resampling (`model.resblock_resample`), dropout, attention by `num_heads` or `head_dim`,
class conditioning; and `load_flax_params` copies OUR parameters into it, so that both run the
same weights (benchmarks/gpu_vs_torch.py checks the outputs agree before timing anything;
tests/test_benchmark_tools.py checks it on the CPU). Attention uses
F.scaled_dot_product_attention. TimeConv runs in float32 (as ours), outside autocast.
"""
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

LOGSNR_INPUTS = {
    "inv_cos": lambda l, lo, hi: torch.atan(torch.exp(-0.5 * l.clamp(-20, 20))) / (0.5 * math.pi),
    "linear": lambda l, lo, hi: (l - lo) / (hi - lo),
    "sigmoid": lambda l, lo, hi: torch.sigmoid(l),
}
LOGSNR_SCALE_RANGE = (-10.0, 10.0)  # UNet.logsnr_scale_range's default


def group_norm(c):
  return nn.GroupNorm(32, c, eps=1e-6)


def conv3(c_in, c_out):
  return nn.Conv2d(c_in, c_out, 3, padding=1)


def sinusoidal_embedding(s, dim):
  """(N,) -> (N, dim): [sin, cos] of 1000*s at frequencies exp(-log(1e4) i/(half-1))."""
  half = dim // 2
  freqs = torch.exp(-math.log(10000.0) *
                    torch.arange(half, dtype=torch.float32, device=s.device) / (half - 1))
  angles = 1000.0 * s[:, None] * freqs[None]
  return F.pad(torch.cat([angles.sin(), angles.cos()], dim=1), (0, dim % 2))


def attention_heads(channels, num_heads, head_dim):
  """(num_heads, head_dim) from exactly one of the two (models/blocks.py's rule)."""
  if (num_heads is None) == (head_dim is None):
    raise ValueError(f"give exactly one of num_heads={num_heads} and head_dim={head_dim}")
  if head_dim is None:
    return num_heads, channels // num_heads
  return channels // head_dim, head_dim


def resample(x, how):
  if how == "down":
    return F.avg_pool2d(x, 2)
  return F.interpolate(x, scale_factor=2, mode="nearest")


class ResnetBlock(nn.Module):
  """GroupNorm-swish-[resample]-conv, FiLM (scale, shift) from emb, GroupNorm-swish-dropout-conv,
  residual (1x1 shortcut when the channels change; the input resampled as h when resampling)."""

  def __init__(self, c_in, c_out, emb_ch, dropout=0.0, resample=None):
    super().__init__()
    self.resample = resample
    self.norm1, self.conv1 = group_norm(c_in), conv3(c_in, c_out)
    self.temb_proj = nn.Linear(emb_ch, 2 * c_out)
    self.norm2, self.conv2 = group_norm(c_out), conv3(c_out, c_out)
    self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
    self.nin_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

  def forward(self, x, emb):
    h = F.silu(self.norm1(x))
    if self.resample is not None:
      h, x = resample(h, self.resample), resample(x, self.resample)
    h = self.conv1(h)
    scale, shift = self.temb_proj(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
    h = self.conv2(self.dropout(F.silu(self.norm2(h) * (1 + scale) + shift)))
    if self.nin_shortcut is not None:
      x = self.nin_shortcut(x)
    return x + h


class AttnBlock(nn.Module):
  """Multi-head self-attention over the H*W positions of each frame, residual."""

  def __init__(self, c, num_heads, head_dim=None):
    super().__init__()
    self.heads, dim = attention_heads(c, num_heads, head_dim)
    self.norm = group_norm(c)
    self.q, self.k, self.v = (nn.Linear(c, self.heads * dim) for _ in range(3))
    self.proj_out = nn.Linear(self.heads * dim, c)

  def forward(self, x):
    n, c, hgt, wid = x.shape
    h = self.norm(x).flatten(2).transpose(1, 2)  # (N, HW, C); a view in channels_last
    q, k, v = (f(h).view(n, hgt * wid, self.heads, -1).transpose(1, 2)
               for f in (self.q, self.k, self.v))
    h = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, hgt * wid, -1)
    return x + self.proj_out(h).transpose(1, 2).reshape(x.shape)


def dft_matrices(k, modes):
  """Real matrices of the K-point rfft (first `modes` bins) and of irfft(n=K) from them: the
  same as dsno_jax.models.time_conv.dft_matrices (cos, -sin, and the inverse's)."""
  f = np.arange(modes)[:, None]
  t = np.arange(k)[None, :]
  angle = 2 * np.pi * f * t / k
  weight = np.where((f == 0) | (2 * f == k), 1.0, 2.0) / k
  return [torch.tensor(m, dtype=torch.float32) for m in
          (np.cos(angle), -np.sin(angle), (weight * np.cos(angle)).T, (-weight * np.sin(angle)).T)]


class TimeConv(nn.Module):
  """h + leaky_relu(irfft(W * rfft(h)[:modes])) along the K frames of each example, in float32
  (outside autocast, like ours), returned in h's dtype. formulation "fft" (torch.fft, complex
  weights) or "dft" (the K-point transforms as small real matmuls: the same function in real
  arithmetic, which torch.compile's code generator handles; it has no complex support)."""

  def __init__(self, c, num_modes, channels_last=False, formulation="fft", num_times=None):
    super().__init__()
    if formulation not in ("fft", "dft"):
      raise ValueError(f"TimeConv formulation={formulation!r}; expected 'fft' or 'dft'")
    self.modes, self.channels_last, self.formulation = num_modes, channels_last, formulation
    self.weight_real = nn.Parameter(torch.rand(c, c, num_modes) / (c * c))
    self.weight_imag = nn.Parameter(torch.rand(c, c, num_modes) / (c * c))
    self.num_times = num_times
    if formulation == "dft" and num_times:  # device constants, outside the state dict
      used = min(num_modes, num_times // 2 + 1)
      for name, m in zip(("cos", "sin", "inv_cos", "inv_sin"), dft_matrices(num_times, used)):
        self.register_buffer(name, m, persistent=False)

  def forward(self, h, k):  # h: (B*K, C, H, W), frames of one example adjacent
    n, c, hgt, wid = h.shape
    with torch.autocast(h.device.type, enabled=False):
      if self.channels_last:  # (B*K, H, W, C) is h's memory: no copy either way
        x = h.permute(0, 2, 3, 1).reshape(n // k, k, hgt, wid, c).float()
        space, mix = "hwc", "bfhwi,iof->bfhwo"
      else:
        x = h.reshape(n // k, k, c, hgt, wid).float()
        space, mix = "chw", "bfihw,iof->bfohw"
      used = min(self.modes, k // 2 + 1)
      wr, wi = self.weight_real.float()[..., :used], self.weight_imag.float()[..., :used]
      if self.formulation == "fft":
        spectrum = torch.fft.rfft(x, dim=1)[:, :used]  # (B, used, ...)
        y = torch.einsum(mix, spectrum, torch.complex(wr, wi))
        update = torch.fft.irfft(y, n=k, dim=1)  # frequencies >= used are zero-padded
      else:
        if k == self.num_times:
          cos, sin, inv_cos, inv_sin = self.cos, self.sin, self.inv_cos, self.inv_sin
        else:
          cos, sin, inv_cos, inv_sin = (m.to(x.device) for m in dft_matrices(k, used))
        xr = torch.einsum(f"ft,bt{space}->bf{space}", cos, x)
        xi = torch.einsum(f"ft,bt{space}->bf{space}", sin, x)
        yr = torch.einsum(mix, xr, wr) - torch.einsum(mix, xi, wi)
        yi = torch.einsum(mix, xr, wi) + torch.einsum(mix, xi, wr)
        out_space = space.replace("c", "o")
        update = (torch.einsum(f"tf,bf{out_space}->bt{out_space}", inv_cos, yr)
                  + torch.einsum(f"tf,bf{out_space}->bt{out_space}", inv_sin, yi))
      out = (x + F.leaky_relu(update, 0.01)).to(h.dtype)
    if self.channels_last:
      return out.reshape(n, hgt, wid, c).permute(0, 3, 1, 2)
    return out.reshape(n, c, hgt, wid)


class Downsample(nn.Module):
  """Stride-2 3x3 conv with SAME padding as in XLA: pad 0 before, 1 after."""

  def __init__(self, c):
    super().__init__()
    self.conv = nn.Conv2d(c, c, 3, stride=2)

  def forward(self, x, emb=None):
    return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
  def __init__(self, c):
    super().__init__()
    self.conv = conv3(c, c)

  def forward(self, x, emb=None):
    return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


def _key(name):
  return name.replace(".", "__")  # module names may not hold dots


class DSNO(nn.Module):
  """noise (B, C, H, W), logsnr (K,), labels (B,) | None -> (B, K, C, H, W).

  time_conv: TimeConv's formulation ("fft" or "dft", see TimeConv); num_times: K, when known
  (the DFT matrices become buffers).

  Layers are held in `self.layers` under our Flax module names ('down_0.block_1' ->
  'down_0__block_1'), so `load_flax_params` is a rename plus transposes. With channels_last,
  the activations stay in that memory format (call `.to(memory_format=torch.channels_last)` on
  the model and the input too)."""

  def __init__(self, model, image_size, channels, num_classes=1, channels_last=False,
               time_conv="fft", num_times=None):
    super().__init__()
    self.ch, self.nrb, self.levels = model.ch, model.num_res_blocks, len(model.ch_mult)
    self.logsnr_input_type, self.emb_ch = model.logsnr_input_type, model.emb_ch
    self.num_classes, self.channels_last = num_classes, channels_last
    time_conv_formulation = time_conv
    self.layers = nn.ModuleDict()
    add = lambda name, module: self.layers.add_module(_key(name), module)
    block = lambda c_in, c_out, **kw: ResnetBlock(c_in, c_out, model.emb_ch, model.dropout, **kw)
    attn = lambda c: AttnBlock(c, model.num_heads, model.head_dim)
    time_conv = lambda c: TimeConv(c, model.num_modes, channels_last, time_conv_formulation,
                                   num_times)
    add("dense0", nn.Linear(model.ch, model.emb_ch))
    add("dense1", nn.Linear(model.emb_ch, model.emb_ch))
    if num_classes > 1:
      add("class_emb", nn.Linear(num_classes, model.emb_ch))
    add("conv_in", conv3(channels, model.ch))
    c, skip_chs, res = model.ch, [model.ch], image_size
    for i, mult in enumerate(model.ch_mult):
      for j in range(self.nrb):
        add(f"down_{i}.block_{j}", block(c, model.ch * mult))
        c = model.ch * mult
        if res in model.attn_resolutions:
          add(f"down_{i}.attn_{j}", attn(c))
        add(f"down_{i}.time_conv_{j}", time_conv(c))
        skip_chs.append(c)
      if i != self.levels - 1:
        add(f"down_{i}.downsample",
            block(c, c, resample="down") if model.resblock_resample else Downsample(c))
        res //= 2
        skip_chs.append(c)
    add("mid.block_1", block(c, c))
    add("mid.attn_1", attn(c))
    add("mid.time_conv", time_conv(c))
    add("mid.block_2", block(c, c))
    for i, mult in reversed(list(enumerate(model.ch_mult))):
      for j in range(self.nrb + 1):
        add(f"up_{i}.block_{j}", block(c + skip_chs.pop(), model.ch * mult))
        c = model.ch * mult
        if res in model.attn_resolutions:
          add(f"up_{i}.attn_{j}", attn(c))
        add(f"up_{i}.time_conv_{j}", time_conv(c))
      if i != 0:
        add(f"up_{i}.upsample", block(c, c, resample="up") if model.resblock_resample
            else Upsample(c))
        res *= 2
    assert not skip_chs
    add("norm_out", group_norm(c))
    add("conv_out", conv3(c, channels))

  @classmethod
  def from_config(cls, config, channels_last=False, time_conv="fft"):
    """The student of `config`; time_conv: TimeConv's formulation, "fft" or "dft"."""
    return cls(config.model, config.data.image_size, config.data.channels,
               config.data.num_classes, channels_last, time_conv,
               len(config.trajectory.save_times))

  def layer(self, name):
    return self.layers[_key(name)]

  def has(self, name):
    return _key(name) in self.layers

  def embedding(self, logsnr, labels, b):
    s = LOGSNR_INPUTS[self.logsnr_input_type](logsnr.float(), *LOGSNR_SCALE_RANGE)
    emb = self.layer("dense1")(F.silu(self.layer("dense0")(sinusoidal_embedding(s, self.ch))))
    emb = emb[None].expand(b, -1, -1)
    if self.num_classes > 1:
      if labels is None:
        raise ValueError(f"labels missing: the model is conditional on {self.num_classes} classes")
      one_hot = F.one_hot(labels.long(), self.num_classes).float()
      emb = emb + self.layer("class_emb")(one_hot)[:, None, :]
    return emb.reshape(-1, emb.shape[-1])

  def _level(self, prefix, h, emb, j, k):
    h = self.layer(f"{prefix}.block_{j}")(h, emb)
    if self.has(f"{prefix}.attn_{j}"):
      h = self.layer(f"{prefix}.attn_{j}")(h)
    return self.layer(f"{prefix}.time_conv_{j}")(h, k)

  def forward(self, noise, logsnr, labels=None):
    b, k = noise.shape[0], logsnr.shape[0]
    emb = self.embedding(logsnr, labels, b)
    h = self.layer("conv_in")(noise)  # once, then K copies folded into the batch (example-major)
    h = h[:, None].expand(b, k, *h.shape[1:]).reshape(b * k, *h.shape[1:])
    if self.channels_last:
      h = h.contiguous(memory_format=torch.channels_last)
    skips = [h]
    for i in range(self.levels):
      for j in range(self.nrb):
        skips.append(self._level(f"down_{i}", skips[-1], emb, j, k))
      if i != self.levels - 1:
        skips.append(self.layer(f"down_{i}.downsample")(skips[-1], emb))
    h = self.layer("mid.attn_1")(self.layer("mid.block_1")(skips[-1], emb))
    h = self.layer("mid.block_2")(self.layer("mid.time_conv")(h, k), emb)
    for i in reversed(range(self.levels)):
      for j in range(self.nrb + 1):
        h = self._level(f"up_{i}", torch.cat([h, skips.pop()], dim=1), emb, j, k)
      if i != 0:
        h = self.layer(f"up_{i}.upsample")(h, emb)
    out = self.layer("conv_out")(F.silu(self.layer("norm_out")(h)))
    return out.reshape(b, k, *out.shape[1:])


def _flat(tree, prefix=()):
  for name, value in tree.items():
    if isinstance(value, dict) or hasattr(value, "items"):
      yield from _flat(value, prefix + (name,))
    else:
      yield prefix + (name,), value


def _leaf_target(module, leaf, value):
  """(torch parameter, value in its layout) for our leaf `leaf` of the torch `module`."""
  value = np.asarray(value, np.float32)
  if isinstance(module, (Downsample, Upsample)):
    module = module.conv
  if isinstance(module, nn.Conv2d):
    if leaf == "bias":
      return module.bias, value
    if value.ndim == 2:  # our Dense nin_shortcut (C_in, C_out) -> a 1x1 conv
      return module.weight, value.T[:, :, None, None]
    return module.weight, value.transpose(3, 2, 0, 1)  # HWIO -> OIHW
  if isinstance(module, nn.Linear):  # Dense (in, out), DenseGeneral (C, H, D) or (H, D, C)
    if leaf == "bias":
      return module.bias, value.reshape(-1)
    return module.weight, value.reshape(module.in_features, module.out_features).T
  if isinstance(module, nn.GroupNorm):
    return {"scale": module.weight, "bias": module.bias}[leaf], value
  if isinstance(module, TimeConv):
    return getattr(module, leaf), value
  raise KeyError(f"no rule for a {type(module).__name__} leaf {leaf!r}")


def load_flax_params(model: DSNO, params) -> DSNO:
  """Copies our Flax student's parameters (a nested dict of arrays) into `model`, in place.

  Every torch parameter must receive exactly one value of its shape (ValueError otherwise), so
  both frameworks run the same weights."""
  done = {}
  for path, value in _flat(params):
    top, sub, leaf = path[0], path[1:-1], path[-1]
    module = model.layer(top)
    for name in sub:
      module = getattr(module, name)
    target, array = _leaf_target(module, leaf, value)
    if tuple(target.shape) != array.shape:
      raise ValueError(f"{'/'.join(path)}: ours {np.shape(value)} -> {array.shape}, torch "
                       f"{tuple(target.shape)}")
    if id(target) in done:
      raise ValueError(f"{'/'.join(path)} and {done[id(target)]} both map to one torch parameter")
    with torch.no_grad():
      target.copy_(torch.from_numpy(np.ascontiguousarray(array)))
    done[id(target)] = "/".join(path)
  missing = [n for n, p in model.named_parameters() if id(p) not in done]
  if missing:
    raise ValueError(f"torch parameters without a value from ours: {missing}")
  return model


# --- pytorch-fid's Inception, random weights ---------------------------------------------------

def fid_inception_v3_random(pfi):
  """pytorch-fid's `fid_inception_v3()` with its FID blocks and random weights, minus the
  weight download (the benchmarks' one copy; tests/test_inception.py keeps its own)."""
  import torchvision  # noqa: PLC0415
  net = torchvision.models.inception_v3(num_classes=1008, aux_logits=False, weights=None,
                                        init_weights=False)
  net.Mixed_5b = pfi.FIDInceptionA(192, pool_features=32)
  net.Mixed_5c = pfi.FIDInceptionA(256, pool_features=64)
  net.Mixed_5d = pfi.FIDInceptionA(288, pool_features=64)
  net.Mixed_6b = pfi.FIDInceptionC(768, channels_7x7=128)
  net.Mixed_6c = pfi.FIDInceptionC(768, channels_7x7=160)
  net.Mixed_6d = pfi.FIDInceptionC(768, channels_7x7=160)
  net.Mixed_6e = pfi.FIDInceptionC(768, channels_7x7=192)
  net.Mixed_7b = pfi.FIDInceptionE_1(1280)
  net.Mixed_7c = pfi.FIDInceptionE_2(2048)
  return net
