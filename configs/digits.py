"""The embedded default: scikit-learn's 8x8 digits, a small class-conditional UNet, CPU-sized.

Sized so that the whole pipeline runs in about 9 minutes on a 2-core CPU, at the data's own
resolution (the measured runs and the reason for each size: benchmarks/README.md, "Figures
from the code's docstrings").
"""
from configs import base


def get_config():
  config = base.get_config()
  data = config.data
  data.name, data.image_size, data.channels = "digits", 8, 1
  data.num_classes, data.random_flip = 10, False

  model = config.model
  model.ch, model.emb_ch, model.ch_mult, model.num_res_blocks = 32, 128, (1, 2), 1
  model.attn_resolutions, model.num_heads, model.dropout = (4,), 1, 0.0

  # `both` (x and eps heads, mixed by SNR), as DSNO's ImageNet-64 teacher: well conditioned at
  # both ends of the log-SNR range, and its x head is an x-hat the student can start from
  # (eps and v teachers cannot seed one: models.student_params_from_teacher)
  config.teacher.mean_type, config.teacher.clip_x = "both", True
  teacher_train = config.teacher.train
  teacher_train.batch_size, teacher_train.num_steps = 64, 1200
  teacher_train.learning_rate, teacher_train.warmup_steps = 5e-4, 100
  teacher_train.grad_clip, teacher_train.ema_decay = 1.0, 0.999
  teacher_train.loss_weighting = "snr_trunc"
  teacher_train.log_every, teacher_train.checkpoint_every = 50, 500
  teacher_train.sample_every = 500

  trajectory = config.trajectory
  trajectory.solver, trajectory.num_steps, trajectory.grid = "phi2m", 32, "uniform_t"
  trajectory.num_examples, trajectory.batch_size, trajectory.shard_size = 2048, 512, 512

  train = config.train
  train.batch_size, train.num_steps, train.learning_rate, train.warmup_steps = 64, 400, 5e-4, 50
  train.milestones, train.ema_decay, train.grad_clip = (320,), 0.999, 1.0
  train.loss, train.time_weighting, train.init_from_teacher = "l1", "snr", True
  train.log_every, train.checkpoint_every, train.sample_every = 25, 100, 100
  # DMD refinement of the one-step output (README, "Refinement"): 200 updates, 50 of them the
  # generator's (fake_steps=4), from the exported student; the digits' own settings, tuned here
  # (not DMD2's): Adam with b1 = 0, no weight decay, a 10x faster fake denoiser, an EMA
  refine = config.refine
  refine.in_pipeline, refine.batch_size, refine.num_steps, refine.fake_steps = True, 64, 200, 4
  refine.learning_rate, refine.fake_learning_rate, refine.ema_decay = 2e-5, 2e-4, 0.99
  refine.b1, refine.weight_decay, refine.grad_clip = 0.0, 0.0, 1.0
  refine.log_every, refine.checkpoint_every = 50, 100
  evaluation = config.eval
  evaluation.num_samples, evaluation.batch_size = 800, 200
  # the accurate solve is phi3m's 64 steps: nearer a dopri5 solve at tol 1e-6 than dopri5 at
  # tol 1e-4 is, in a third of its evaluations (benchmarks/README.md, "The accurate solve")
  evaluation.teacher_rows = ("ddim:1,2,4,8,16", "dpmpp2m:2,4,8,16", "phi2m:2,4,8,16",
                             "phi3m:64")
  evaluation.memorization = True  # 1,437 training images: does DSNO copy them?
  return config
