"""One UNet backbone: the Progressive-Distillation teacher, and DSNO (the same net on K times + TimeConv)."""
import dataclasses
from typing import Any, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsno_jax import backend
from dsno_jax.models.blocks import (AttnBlock, ResnetBlock, conv3x3, group_norm, logsnr_input,
                                    sinusoidal_embedding, upsample_nearest)
from dsno_jax.models.time_conv import TimeConv

MIDDLE = "middle"  # the "intermediates" entry that holds the middle block's output


def middle_features(model: "UNet", params, x, logsnr, y=None, *, train: bool, rngs=None):
  """The middle block's output (B, H / 2^(L-1), W / 2^(L-1), C_mid) of `model` at these inputs.

  Read from the same forward pass (flax `sow`), so there is one UNet; the up path's output is
  unused, so XLA's dead-code elimination may drop it under jit.
  """
  _, variables = model.apply({"params": params}, x, logsnr, y, train=train, rngs=rngs,
                             mutable=["intermediates"])
  return variables["intermediates"][MIDDLE][0]


class UNet(nn.Module):
  """The UNet of Progressive Distillation (parameter names and shapes match its checkpoints).

  __call__(x (B, H, W, C), logsnr (B,), y (B,) int | None, *, train) -> (B, H, W, out_ch).
  """
  ch: int
  emb_ch: int
  out_ch: int
  ch_mult: Tuple[int, ...]
  num_res_blocks: int
  attn_resolutions: Tuple[int, ...]
  num_heads: Optional[int] = None
  head_dim: Optional[int] = None
  dropout: float = 0.0
  logsnr_input_type: str = "inv_cos"
  logsnr_scale_range: Tuple[float, float] = (-10.0, 10.0)
  resblock_resample: bool = False
  num_classes: int = 1
  image_size: Optional[int] = None  # when set, inputs must be this many pixels square
  dtype: Any = jnp.float32  # compute dtype; parameters are float32
  remat: bool = False  # recompute each block in the backward pass

  @nn.compact
  def __call__(self, x, logsnr, y=None, *, train: bool):
    batch = self._check_image(x)
    logsnr = jnp.asarray(logsnr)
    if logsnr.shape != (batch,):
      raise ValueError(f"logsnr has shape {logsnr.shape}; expected ({batch},), one per image")
    emb = self._time_embedding(logsnr)
    class_emb = self._class_embedding(y, batch)
    if class_emb is not None:
      emb = emb + class_emb
    return self._backbone(x, emb, train, num_times=None)

  # --- input checks ----------------------------------------------------------
  def _check_image(self, x) -> int:
    if x.ndim != 4:
      raise ValueError(f"input has shape {x.shape}; expected rank 4 (B, H, W, C)")
    _, h, w, _ = x.shape
    if h != w:
      raise ValueError(f"input is {h}x{w} pixels; expected a square image")
    if self.image_size is not None and h != self.image_size:
      raise ValueError(f"input is {h}x{w} pixels; expected {self.image_size}x{self.image_size}")
    halvings = len(self.ch_mult) - 1
    if h % (2 ** halvings):
      raise ValueError(f"image size {h} cannot be halved {halvings} times "
                       f"(ch_mult={tuple(self.ch_mult)}); use a multiple of {2 ** halvings}")
    return x.shape[0]

  # --- embeddings --------------------------------------------------------------
  def _time_embedding(self, logsnr):
    """(N,) log-SNRs -> (N, emb_ch)."""
    s = logsnr_input(logsnr.astype(jnp.float32), self.logsnr_input_type,
                     self.logsnr_scale_range)
    emb = nn.Dense(self.emb_ch, dtype=self.dtype, name="dense0")(
        sinusoidal_embedding(s, self.ch))
    return nn.Dense(self.emb_ch, dtype=self.dtype, name="dense1")(nn.swish(emb))

  def _class_embedding(self, y, batch: int):
    """(B,) labels -> (B, emb_ch), or None for an unconditional model."""
    if self.num_classes <= 1:
      if y is not None:
        raise ValueError(f"labels given to an unconditional model (num_classes={self.num_classes})")
      return None
    if y is None:
      raise ValueError(f"labels missing: the model is conditional on {self.num_classes} classes")
    y = jnp.asarray(y)
    if y.shape != (batch,):
      raise ValueError(f"labels have shape {y.shape}; expected ({batch},)")
    one_hot = jax.nn.one_hot(y, self.num_classes, dtype=jnp.float32)
    return nn.Dense(self.emb_ch, dtype=self.dtype, name="class_emb")(one_hot)

  # --- the backbone --------------------------------------------------------------
  def _time_mix(self, h, name: str, num_times: Optional[int]):
    """Hook after every resolution block; the teacher has no time axis."""
    del name, num_times
    return h

  def _blocks(self):
    if self.remat:
      return nn.remat(ResnetBlock), nn.remat(AttnBlock)
    return ResnetBlock, AttnBlock

  def _backbone(self, x, emb, train: bool, num_times: Optional[int]):
    """x: (B, H, W, C); emb: (N, emb_ch) with N = B * (num_times or 1)."""
    resnet, attn = self._blocks()
    res_kw = dict(dropout=self.dropout, deterministic=not train, dtype=self.dtype)
    attn_kw = dict(num_heads=self.num_heads, head_dim=self.head_dim, dtype=self.dtype)
    h = conv3x3(self.ch, self.dtype, "conv_in")(x)
    if num_times is not None:  # one conv_in, then K copies folded into the batch
      b = h.shape[0]
      h = jnp.broadcast_to(h[:, None], (b, num_times) + h.shape[1:]).reshape((-1,) + h.shape[1:])
    skips = [h]
    levels = len(self.ch_mult)
    for i in range(levels):
      for j in range(self.num_res_blocks):
        h = resnet(out_ch=self.ch * self.ch_mult[i], name=f"down_{i}.block_{j}", **res_kw)(
            skips[-1], emb)
        if h.shape[1] in self.attn_resolutions:
          h = attn(name=f"down_{i}.attn_{j}", **attn_kw)(h)
        h = self._time_mix(h, f"down_{i}.time_conv_{j}", num_times)
        skips.append(h)
      if i != levels - 1:
        skips.append(self._downsample(skips[-1], emb, f"down_{i}.downsample", resnet, res_kw))

    h = resnet(name="mid.block_1", **res_kw)(skips[-1], emb)
    h = attn(name="mid.attn_1", **attn_kw)(h)
    h = self._time_mix(h, "mid.time_conv", num_times)
    h = resnet(name="mid.block_2", **res_kw)(h, emb)
    # a no-op unless the caller makes "intermediates" mutable (middle_features)
    self.sow("intermediates", MIDDLE, h)

    for i in reversed(range(levels)):
      for j in range(self.num_res_blocks + 1):
        h = jnp.concatenate([h, skips.pop()], axis=-1)
        h = resnet(out_ch=self.ch * self.ch_mult[i], name=f"up_{i}.block_{j}", **res_kw)(h, emb)
        if h.shape[1] in self.attn_resolutions:
          h = attn(name=f"up_{i}.attn_{j}", **attn_kw)(h)
        h = self._time_mix(h, f"up_{i}.time_conv_{j}", num_times)
      if i != 0:
        h = self._upsample(h, emb, f"up_{i}.upsample", resnet, res_kw)
    assert not skips

    h = group_norm("norm_out", self.dtype)(h, swish=True)
    h = conv3x3(self.out_ch, self.dtype, "conv_out", kernel_init=nn.initializers.zeros)(h)
    return h.astype(jnp.float32)

  def _downsample(self, h, emb, name, resnet, res_kw):
    if self.resblock_resample:
      return resnet(resample="down", name=name, **res_kw)(h, emb)
    return conv3x3(h.shape[-1], self.dtype, name, strides=(2, 2))(h)

  def _upsample(self, h, emb, name, resnet, res_kw):
    if self.resblock_resample:
      return resnet(resample="up", name=name, **res_kw)(h, emb)
    return conv3x3(h.shape[-1], self.dtype, name)(upsample_nearest(h))


class DSNO(UNet):
  """The DSNO student: the UNet run on K output times at once, with a TimeConv after every
  resolution block (Zheng et al., ICML 2023, Section 3 and Figure 1).

  __call__(noise (B, H, W, C), logsnr (K,), y (B,) | None, *, train) -> (B, K, H, W, out_ch).
  """
  num_modes: int = 2
  num_times: Optional[int] = None  # when set, logsnr must have this length K
  # TimeConv's formulation, "fft" | "dft" (models/time_conv.py); the same function either way,
  # by default the faster one on the backend this is built on (dsno_jax.backend)
  time_conv_formulation: str = dataclasses.field(
      default_factory=backend.time_conv_formulation)

  @nn.compact
  def __call__(self, noise, logsnr, y=None, *, train: bool):
    batch = self._check_image(noise)
    logsnr = jnp.asarray(logsnr)
    k = logsnr.shape[0] if logsnr.ndim == 1 else -1
    if logsnr.ndim != 1 or (self.num_times is not None and k != self.num_times):
      expected = self.num_times if self.num_times is not None else "K"
      raise ValueError(f"logsnr has shape {logsnr.shape}; expected ({expected},), "
                       "one log-SNR per output time")
    emb = jnp.broadcast_to(self._time_embedding(logsnr)[None], (batch, k, self.emb_ch))
    class_emb = self._class_embedding(y, batch)
    if class_emb is not None:
      emb = emb + class_emb[:, None, :]
    out = self._backbone(noise, emb.reshape(batch * k, self.emb_ch), train, num_times=k)
    return out.reshape((batch, k) + out.shape[1:])

  def _time_mix(self, h, name: str, num_times: Optional[int]):
    unfolded = h.reshape((-1, num_times) + h.shape[1:])
    return TimeConv(num_modes=self.num_modes, formulation=self.time_conv_formulation,
                    name=name)(unfolded).reshape(h.shape)
