"""A tiny conditional config for tests: 8x8x1 images, two levels, a few steps."""
from configs import base


def get_config():
  config = base.get_config()
  data = config.data
  data.name, data.image_size, data.channels, data.num_classes = "digits", 8, 1, 10
  model = config.model
  model.ch, model.emb_ch, model.ch_mult, model.num_res_blocks = 32, 64, (1, 2), 1
  model.attn_resolutions, model.num_heads = (4,), 1
  trajectory = config.trajectory
  trajectory.num_steps, trajectory.num_examples = 8, 32
  trajectory.batch_size, trajectory.shard_size = 8, 8
  for training in (config.train, config.teacher.train):
    training.batch_size, training.num_steps, training.warmup_steps = 8, 4, 2
  config.train.log_every, config.train.checkpoint_every = 1, 2
  config.eval.num_samples, config.eval.batch_size = 16, 8
  return config
