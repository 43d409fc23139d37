"""ImageNet-64, class-conditional, from the 16-step Progressive-Distillation `both` teacher (paper: FID 7.83)."""
from configs import base


def get_config():
  config = base.get_config()
  d = config.data
  d.name, d.image_size, d.channels, d.num_classes = "imagenet_resized/64x64", 64, 3, 1000
  d.eval_split = "validation"

  m = config.model
  m.ch, m.emb_ch, m.ch_mult, m.num_res_blocks = 192, 768, (1, 2, 3, 4), 3
  m.attn_resolutions, m.num_heads, m.head_dim = (8, 16, 32), None, 64
  m.dropout, m.resblock_resample = 0.1, True

  config.teacher.mean_type = "both"
  # Teacher training (mode train_teacher) when no published teacher is used; PD-style:
  t = config.teacher.train
  t.batch_size, t.num_steps, t.learning_rate, t.warmup_steps = 2048, 800_000, 2e-4, 5000
  t.ema_decay, t.grad_clip, t.loss_weighting = 0.9999, 1.0, "snr_trunc"
  t.log_every, t.checkpoint_every, t.sample_every = 100, 5000, 20_000
  t.fsdp = True

  g = config.trajectory
  g.solver, g.num_steps, g.grid = "ddim", 16, "uniform_t"
  g.num_examples, g.batch_size, g.shard_size = 2_400_000, 4096, 8192

  s = config.train
  s.batch_size, s.num_steps = 2048, 480_000
  s.learning_rate, s.warmup_steps = 2e-4, 10_000
  s.milestones = (200_000, 400_000)
  s.ema_decay = 0.9999
  s.loss, s.time_weighting = "l1", "snr"
  s.fsdp = True
  s.log_every, s.checkpoint_every, s.sample_every = 100, 5000, 10_000

  config.eval.num_samples, config.eval.batch_size = 50_000, 1000
  return config
