"""The embedded default: scikit-learn's 8x8 digits, a small class-conditional UNet, CPU-sized.

Sized for about 20 minutes on the 2-core CPU machine. Measured there, from a fresh clone
(`python -m dsno_jax.main --config=configs/digits.py --workdir=W --mode=pipeline`): 21 min 8 s
in all; teacher 339 s (3.5 steps/s), classifier 6 s, trajectories 66 s (41 examples/s), DSNO
410 s (1.1 steps/s; 0.93 s per step in benchmarks/train_step.py --config digits), evaluation
406 s (13 teacher rows of 800 samples, the adaptive dopri5 solve about 130 s of it).
Result: DSNO FD-digits 2.58 at 1 NFE vs the teacher's 2.72 with DDIM-8 and 1.74 accurate;
97.1% of DSNO's samples recognised as their class. With dsno_jax/xla_flags.py's XLA:CPU flag
(session 3): 16 min 22 s without the install (teacher 245 s, DSNO 320 s, evaluation 338 s),
DSNO FD-digits 2.573.
- 8x8 is the data's own resolution (16x16 would cost 4x per step for no new information).
- ch 32 / emb 128 / ch_mult (1, 2) / one res block per level / attention at 4x4: 0.83M
  parameters; a second res block per level cost +50% on the DSNO step for little gain.
- Teacher: 1200 steps of batch 64 (53 epochs); v-prediction, which stays well-conditioned at
  both ends of the log-SNR range, with PD's max(SNR, 1) weighting.
- Trajectories: 2048 of them with the 2M exponential integrator on 32 uniform-t steps
  (36 NFE with the targets; RMSE 3e-3 on the digits mixture, better than DDIM-64).
- DSNO: 400 steps of batch 64 (12.5 epochs of the trajectories); L1 with the paper's SNR
  time weights, initialised from the teacher.
- Evaluation: 800 samples per row (an earlier run with 1000 samples and a 1500-step teacher
  and 500-step DSNO: 27 min in all, DSNO 2.17 vs DDIM-8 2.34).
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
