"""The embedded default: scikit-learn's 8x8 digits, a small class-conditional UNet, CPU-sized.

Sized so that teacher training + trajectories + DSNO training fit in about 20 minutes on 2
CPU cores. Measured on the shared 2-core machine (1 CPU device, batch 64, float32; under
load, so a quiet machine is up to 2x faster): teacher train step 0.2-0.35 s, DSNO (K=4)
train step 0.97 s, teacher forward 1.6 ms per image per NFE, compiles about 20 s each.
- 8x8 is the data's own resolution (16x16 would cost 4x per step for no new information).
- ch 32 / emb 128 / ch_mult (1, 2) / one res block per level / attention at 4x4: 0.83M
  parameters; a second res block per level cost +50% on the DSNO step for little gain.
- Teacher: 1500 steps of batch 64 (67 epochs) ~ 4-9 min; v-prediction, which stays
  well-conditioned at both ends of the log-SNR range, with PD's max(SNR, 1) weighting.
- Trajectories: 2048 of them with the 2M exponential integrator on 32 uniform-t steps
  (36 NFE with the targets; RMSE 3e-3 on the digits mixture, better than DDIM-64) ~ 1-2 min.
- DSNO: 500 steps of batch 64 (16 epochs of the trajectories) ~ 4-8 min; L1 with the
  paper's SNR time weights, initialised from the teacher.
"""
from configs import base


def get_config():
  config = base.get_config()
  d = config.data
  d.name, d.image_size, d.channels, d.num_classes, d.random_flip = "digits", 8, 1, 10, False

  m = config.model
  m.ch, m.emb_ch, m.ch_mult, m.num_res_blocks = 32, 128, (1, 2), 1
  m.attn_resolutions, m.num_heads, m.dropout = (4,), 1, 0.0

  config.teacher.mean_type, config.teacher.clip_x = "v", True
  t = config.teacher.train
  t.batch_size, t.num_steps, t.learning_rate, t.warmup_steps = 64, 1200, 5e-4, 100
  t.grad_clip, t.ema_decay, t.loss_weighting = 1.0, 0.999, "snr_trunc"
  t.log_every, t.checkpoint_every, t.sample_every = 50, 500, 500

  g = config.trajectory
  g.solver, g.num_steps, g.grid = "dpm2m", 32, "uniform_t"
  g.num_examples, g.batch_size, g.shard_size = 2048, 512, 512

  s = config.train
  s.batch_size, s.num_steps, s.learning_rate, s.warmup_steps = 64, 400, 5e-4, 50
  s.milestones, s.ema_decay, s.grad_clip = (320,), 0.999, 1.0
  s.loss, s.time_weighting, s.init_from_teacher = "l1", "snr", True
  s.log_every, s.checkpoint_every, s.sample_every = 25, 100, 100
  config.eval.num_samples, config.eval.batch_size = 800, 200
  return config
