"""The fixed bench configuration of benchmarks/: 32x32x3, ch 64, ch_mult (1, 2, 2), K = 4, batch 8."""
from configs import base


def get_config():
  config = base.get_config()
  data = config.data
  data.name, data.image_size, data.channels, data.num_classes = "cifar10", 32, 3, 1
  model = config.model
  model.ch, model.emb_ch, model.ch_mult, model.num_res_blocks = 64, 256, (1, 2, 2), 2
  model.attn_resolutions, model.num_heads, model.head_dim, model.dropout = (16,), 1, None, 0.0
  config.trajectory.save_times = (0.5625, 0.25, 0.0625, 0.0)  # K = 4
  config.train.batch_size = 8
  return config
