"""A tiny conditional config for tests: 8x8x1 images, two levels, a few steps."""
from configs import base


def get_config():
  config = base.get_config()
  d = config.data
  d.name, d.image_size, d.channels, d.num_classes = "digits", 8, 1, 10
  m = config.model
  m.ch, m.emb_ch, m.ch_mult, m.num_res_blocks = 32, 64, (1, 2), 1
  m.attn_resolutions, m.num_heads = (4,), 1
  g = config.trajectory
  g.num_steps, g.num_examples, g.batch_size, g.shard_size = 8, 32, 8, 8
  for t in (config.train, config.teacher.train):
    t.batch_size, t.num_steps, t.warmup_steps = 8, 4, 2
  config.train.log_every, config.train.checkpoint_every = 1, 2
  config.eval.num_samples, config.eval.batch_size = 16, 8
  return config
