"""ImageNet-64, class-conditional, from the 16-step Progressive-Distillation `both` teacher (paper: FID 7.83)."""
from configs import base


def get_config():
  config = base.get_config()
  data = config.data
  data.name, data.image_size, data.channels = "imagenet_resized/64x64", 64, 3
  data.num_classes, data.eval_split = 1000, "validation"

  model = config.model
  model.ch, model.emb_ch, model.ch_mult, model.num_res_blocks = 192, 768, (1, 2, 3, 4), 3
  model.attn_resolutions, model.num_heads, model.head_dim = (8, 16, 32), None, 64
  model.dropout, model.resblock_resample = 0.1, True

  config.teacher.mean_type = "both"
  # the published teacher is meant: --mode=pipeline refuses to train one (800k steps) unless
  # --config.teacher.train_from_scratch=True
  config.teacher.train_from_scratch = False
  # Teacher training (mode train_teacher) when no published teacher is used; PD-style:
  teacher_train = config.teacher.train
  teacher_train.batch_size, teacher_train.num_steps = 2048, 800_000
  teacher_train.learning_rate, teacher_train.warmup_steps = 2e-4, 5000
  teacher_train.ema_decay, teacher_train.grad_clip = 0.9999, 1.0
  teacher_train.loss_weighting = "snr_trunc"
  teacher_train.log_every, teacher_train.checkpoint_every = 100, 5000
  teacher_train.sample_every = 20_000
  teacher_train.fsdp = True

  trajectory = config.trajectory
  trajectory.solver, trajectory.num_steps, trajectory.grid = "ddim", 16, "uniform_t"
  trajectory.num_examples, trajectory.batch_size, trajectory.shard_size = 2_400_000, 4096, 8192

  train = config.train
  train.batch_size, train.num_steps = 2048, 480_000
  train.learning_rate, train.warmup_steps = 2e-4, 10_000
  train.milestones = (200_000, 400_000)
  train.ema_decay = 0.9999
  train.loss, train.time_weighting = "l1", "snr"
  train.fsdp = True
  train.log_every, train.checkpoint_every, train.sample_every = 100, 5000, 10_000

  # Refinement (mode refine): DMD2's ImageNet-64 run with its GAN term (github.com/tianweiy/DMD2,
  # experiments/imagenet/imagenet_gan_classifier_genloss3e-3_diffusion1000_lr2e-6_scratch.sh and
  # main/edm/train_edm.py). The optimiser (AdamW (0.9, 0.999), weight decay 0.01, 2e-6 both, 5
  # fake updates per generator update, no EMA) is configs/base.py's.
  refine = config.refine
  refine.batch_size, refine.num_steps = 280, 200_000  # DMD2: 40 per GPU x 7 GPUs; 200k iterations
  refine.gan_discriminator_weight, refine.gan_weight = 1e-2, 3e-3
  refine.fsdp = True

  config.eval.num_samples, config.eval.batch_size = 50_000, 1000
  return config
