"""CIFAR-10, unconditional, from the Progressive-Distillation x-prediction teacher (paper: FID 3.78)."""
from configs import base


def get_config():
  config = base.get_config()
  d = config.data
  d.name, d.image_size, d.channels, d.num_classes, d.random_flip = "cifar10", 32, 3, 1, True

  m = config.model
  m.ch, m.emb_ch, m.ch_mult, m.num_res_blocks = 256, 1024, (1, 1, 1), 3
  m.attn_resolutions, m.num_heads, m.head_dim = (8, 16), 1, None
  m.dropout, m.resblock_resample = 0.2, True

  config.teacher.mean_type = "x"
  # Teacher training (mode train_teacher) when no published teacher is used; PD-style:
  t = config.teacher.train
  t.batch_size, t.num_steps, t.learning_rate, t.warmup_steps = 128, 800_000, 2e-4, 5000
  t.ema_decay, t.grad_clip, t.loss_weighting = 0.9999, 1.0, "snr_trunc"
  t.log_every, t.checkpoint_every, t.sample_every = 100, 5000, 20_000

  g = config.trajectory
  g.solver, g.num_steps, g.grid = "ddim", 512, "uniform_t"
  g.num_examples, g.batch_size, g.shard_size = 1_000_000, 2048, 8192

  s = config.train
  s.batch_size, s.num_steps = 256, 400_000
  s.learning_rate, s.warmup_steps = 2e-4, 10_000
  s.milestones = (100_000, 200_000, 300_000)
  s.ema_decay = 0.9999
  s.loss, s.time_weighting = "vgg", "uniform"
  s.log_every, s.checkpoint_every, s.sample_every = 100, 5000, 10_000

  config.eval.num_samples, config.eval.batch_size = 50_000, 1000
  return config
