"""The base config: every field the code reads, with its unit; other configs override a few."""
import ml_collections


def get_config():
  config = ml_collections.ConfigDict()
  config.seed = 0  # PRNG seed of everything (init, data order, noise)

  # --- data -------------------------------------------------------------
  config.data = d = ml_collections.ConfigDict()
  d.name = "digits"  # "digits" | "cifar10" | "imagenet_resized/64x64" | "folder"
  d.data_dir = ""  # TFDS data_dir ("" = TFDS default); for "folder": the image root
  d.image_size = 16  # pixels (square); images are resized to this
  d.channels = 1  # image channels C
  d.num_classes = 10  # 1 = unconditional
  d.random_flip = False  # horizontal flips when training the teacher
  d.train_split = "train"
  d.eval_split = "test"

  # --- diffusion maths (SPEC section 1) ----------------------------------
  config.diffusion = f = ml_collections.ConfigDict()
  f.logsnr_min = -20.0  # log-SNR at t = 1
  f.logsnr_max = 20.0  # log-SNR at t = 0

  # --- the UNet backbone shared by teacher and student (SPEC sections 2, 3)
  config.model = m = ml_collections.ConfigDict()
  m.ch = 32  # base channels
  m.emb_ch = 128  # embedding width
  m.ch_mult = (1, 2)  # channel multiplier per level
  m.num_res_blocks = 1  # ResnetBlocks per level on the down path
  m.attn_resolutions = (8,)  # feature resolutions (pixels) with self-attention
  m.num_heads = 1  # attention heads (None when head_dim is set)
  m.head_dim = ml_collections.config_dict.placeholder(int)  # channels per head
  m.dropout = 0.0  # dropout rate in ResnetBlocks
  m.logsnr_input_type = "inv_cos"  # "inv_cos" | "linear" | "sigmoid"
  m.resblock_resample = False  # ResnetBlock (True) or conv (False) resampling
  m.dtype = "float32"  # compute dtype: "float32" | "bfloat16" (params stay float32)
  m.num_modes = 2  # DSNO: Fourier modes kept by every TimeConv
  m.remat = False  # rematerialise each block in the backward pass (saves memory)
  # convolution kernel gradient: "auto" (the "shifted" per-tap matmuls on CPU, where XLA's own
  # is slow; XLA's elsewhere) | "xla" | "shifted"; see dsno_jax/models/conv.py
  m.conv_impl = "auto"
  m.fused_norm = True  # GroupNorm+FiLM+swish in one pass (models/norm.py); False: plain
  m.time_conv_impl = "auto"  # TimeConv: "auto" (dft on CPU, fft elsewhere) | "fft" | "dft"

  # --- the teacher --------------------------------------------------------
  config.teacher = t = ml_collections.ConfigDict()
  t.mean_type = "x"  # network output: "x" | "eps" | "v" | "both"
  t.clip_x = True  # clip x-hat to [-1, 1] in the denoiser
  t.checkpoint = ""  # PD msgpack or dsno_jax orbax checkpoint; "" = train here
  t.kind = "unet"  # "unet" (a network) | "digits_mixture" (exact Gaussian mixture of the digits)
  # Teacher training (mode train_teacher), for data sets with no published teacher.
  t.train = tt = ml_collections.ConfigDict()
  tt.batch_size = 64  # global batch (examples)
  tt.num_steps = 1000  # optimiser steps
  tt.learning_rate = 2e-4  # peak Adam learning rate
  tt.warmup_steps = 100  # linear warm-up length (steps)
  tt.ema_decay = 0.999  # EMA of parameters, per step
  tt.loss_weighting = "snr_trunc"  # "snr_trunc" (max(SNR, 1) on x) | "eps" | "v"
  # The rest as in config.train (the student's section), for the teacher's run:
  tt.b1, tt.b2, tt.eps = 0.9, 0.999, 1e-8  # Adam
  tt.warmup_init = 1e-3  # warm-up starts at this fraction of the learning rate
  tt.milestones, tt.decay = (), 0.5  # steps at which the learning rate is multiplied by decay
  tt.grad_clip, tt.grad_accum = 0.0, 1  # global-norm clip (0 = off); micro-batches per step
  tt.log_every, tt.checkpoint_every, tt.keep_checkpoints = 50, 500, 3  # steps, steps, count
  tt.sample_every = 0  # steps between sample grids (0 = off)
  tt.fsdp = False  # shard parameters and optimiser state over devices

  # --- teacher trajectories (SPEC section 4, mode generate) -----------------
  config.trajectory = g = ml_collections.ConfigDict()
  g.save_times = (0.5625, 0.25, 0.0625, 0.0)  # t in [0, 1] of the K outputs ("quad")
  g.solver = "ddim"  # ddim | dpm2m | dpm3m | tsit5 | dopri5 | dopri8
  g.num_steps = 512  # fixed-step solvers: steps from t=1 to t=0
  g.grid = "uniform_t"  # uniform_t | uniform_logsnr | edm
  g.rtol = 1e-5  # adaptive solvers
  g.atol = 1e-5  # adaptive solvers
  g.num_examples = 1024  # trajectories to generate
  g.batch_size = 256  # global batch of the generation (examples)
  g.shard_size = 256  # examples per written shard (resume granularity)
  g.targets_dtype = "float32"  # "float32" | "float16" storage of the targets
  g.dir = ""  # "" = WORKDIR/trajectories

  # --- DSNO student training (SPEC section 5, mode train) -------------------
  config.train = s = ml_collections.ConfigDict()
  s.batch_size = 64  # global batch (examples)
  s.num_steps = 1000  # optimiser steps
  s.learning_rate = 2e-4  # peak Adam learning rate
  s.b1 = 0.9
  s.b2 = 0.999
  s.eps = 1e-8
  s.warmup_steps = 100  # linear warm-up from warmup_init * lr (steps)
  s.warmup_init = 1e-3  # warm-up starts at this fraction of the learning rate
  s.milestones = ()  # steps at which the learning rate is multiplied by decay
  s.decay = 0.5  # factor applied at each milestone
  s.ema_decay = 0.9999  # EMA of parameters, per step
  s.grad_clip = 0.0  # global-norm clip (0 = off)
  s.grad_accum = 1  # micro-batches per optimiser step
  s.loss = "l2"  # "l1" | "l2" | "vgg" | "lpips"
  s.perceptual_weights = ""  # losses vgg/lpips: converted .npz of VGG16 (+ LPIPS heads)
  s.time_weighting = "uniform"  # "uniform" | "snr" (clip(exp(lam/2), 1, 1e4))
  s.init_from_teacher = True  # copy teacher weights into the student
  s.log_every = 50  # steps between metric writes
  s.checkpoint_every = 500  # steps between checkpoints
  s.keep_checkpoints = 3  # checkpoints kept
  s.sample_every = 0  # steps between sample grids (0 = off)
  s.fsdp = False  # shard parameters and optimiser state over devices

  # --- evaluation (mode evaluate) --------------------------------------------
  config.eval = e = ml_collections.ConfigDict()
  e.num_samples = 1000  # samples per metric
  e.batch_size = 250  # global batch of sampling
  e.teacher_solvers = ("ddim", "dpm2m")  # teacher solvers to compare
  e.teacher_nfes = (1, 2, 4, 8, 16, 64)  # teacher NFEs to compare
  e.accurate_solver = "dopri5"  # the teacher's reference ("accurate") solve
  e.accurate_tolerance = 1e-4  # its rtol = atol
  e.classifier_steps = 600  # optimiser steps of the FD-digits classifier
  e.reference_stats = ""  # .npz with mu and sigma; "" = computed from data
  e.inception_weights = ""  # converted inception_fid.npz

  # --- several processes (jax.distributed); unset = environment / auto-detection ----------
  config.distributed = dd = ml_collections.ConfigDict()
  dd.coordinator_address = ""  # "host:port" of process 0 ("" = JAX_COORDINATOR_ADDRESS)
  dd.num_processes = 0  # processes in the run (0 = JAX_NUM_PROCESSES or auto-detect)
  dd.process_id = -1  # this process (-1 = JAX_PROCESS_ID or auto-detect)

  config.profile = False  # write a jax.profiler trace of a few steps
  return config
