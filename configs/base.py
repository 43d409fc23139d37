"""The base config: every field the code reads, with its unit; other configs override a few."""
import ml_collections


def get_config():
  config = ml_collections.ConfigDict()
  config.seed = 0  # PRNG seed of everything (init, data order, noise)

  # --- data -------------------------------------------------------------
  config.data = data = ml_collections.ConfigDict()
  data.name = "digits"  # "digits" | "cifar10" | "imagenet_resized/64x64" | "folder"
  data.data_dir = ""  # TFDS data_dir ("" = TFDS default); for "folder": the image root
  data.image_size = 16  # pixels (square); images are resized to this
  data.channels = 1  # image channels C
  data.num_classes = 10  # 1 = unconditional
  data.random_flip = False  # horizontal flips when training the teacher
  data.train_split = "train"
  data.eval_split = "test"
  data.num_workers = 0  # input worker processes per host (0: threads in the training process)
  # GB (1e9 bytes) of local disk per process for copies of trajectory shards read from a bucket
  # (a local data set is read in place); the shards a process reads at once fit in half of it
  data.cache_gb = 20.0

  # --- diffusion maths: the cosine log-SNR schedule (dsno_jax/diffusion.py) ----
  config.diffusion = diffusion = ml_collections.ConfigDict()
  diffusion.logsnr_min = -20.0  # log-SNR at t = 1
  diffusion.logsnr_max = 20.0  # log-SNR at t = 0

  # --- the UNet backbone shared by teacher and student (DSNO adds TimeConvs)
  config.model = model = ml_collections.ConfigDict()
  model.ch = 32  # base channels
  model.emb_ch = 128  # embedding width
  model.ch_mult = (1, 2)  # channel multiplier per level
  model.num_res_blocks = 1  # ResnetBlocks per level on the down path
  model.attn_resolutions = (8,)  # feature resolutions (pixels) with self-attention
  model.num_heads = 1  # attention heads (None when head_dim is set)
  model.head_dim = ml_collections.config_dict.placeholder(int)  # channels per head
  model.dropout = 0.0  # dropout rate in ResnetBlocks
  model.logsnr_input_type = "inv_cos"  # "inv_cos" | "linear" | "sigmoid"
  model.resblock_resample = False  # ResnetBlock (True) or conv (False) resampling
  model.dtype = "float32"  # compute dtype: "float32" | "bfloat16" (params stay float32)
  model.num_modes = 2  # DSNO: Fourier modes kept by every TimeConv
  model.remat = False  # rematerialise each block in the backward pass (saves memory)
  # DSNO's TimeConv formulation (the same function): "auto" (dsno_jax.backend's choice for the
  # backend the model is built on: dft on CPU, fft elsewhere) | "fft" | "dft"
  model.time_conv_impl = "auto"

  # --- the teacher --------------------------------------------------------
  config.teacher = teacher = ml_collections.ConfigDict()
  teacher.mean_type = "x"  # network output: "x" | "eps" | "v" | "both"
  teacher.clip_x = True  # clip x-hat to [-1, 1] in the denoiser
  teacher.checkpoint = ""  # PD msgpack or dsno_jax orbax checkpoint; "" = train here
  # may --mode=pipeline train the teacher when teacher.checkpoint is ""? Configs of a published
  # teacher set False, so that a forgotten checkpoint is refused before any work
  teacher.train_from_scratch = True
  # compute dtype of the teacher's denoiser (trajectories, teacher baselines, sample grids):
  # "float32" | "bfloat16"; separate from model.dtype, which the student trains in
  teacher.dtype = "float32"
  # "unet" (a network) | "digits_mixture" (the exact Gaussian mixture of the digits)
  teacher.kind = "unet"
  # Teacher training (mode train_teacher), for data sets with no published teacher.
  teacher.train = teacher_train = ml_collections.ConfigDict()
  teacher_train.batch_size = 64  # global batch (examples)
  teacher_train.num_steps = 1000  # optimiser steps
  teacher_train.learning_rate = 2e-4  # peak Adam learning rate
  teacher_train.warmup_steps = 100  # linear warm-up length (steps)
  teacher_train.ema_decay = 0.999  # EMA of parameters, per step
  teacher_train.loss_weighting = "snr_trunc"  # "snr_trunc" (max(SNR, 1) on x) | "eps" | "v"
  # The rest as in config.train (the student's section), for the teacher's run:
  teacher_train.b1, teacher_train.b2, teacher_train.eps = 0.9, 0.999, 1e-8  # Adam
  teacher_train.warmup_init = 1e-3  # warm-up starts at this fraction of the learning rate
  teacher_train.milestones = ()  # steps at which the learning rate is multiplied by decay
  teacher_train.decay = 0.5
  teacher_train.grad_clip = 0.0  # global-norm clip (0 = off)
  teacher_train.grad_accum = 1  # micro-batches per optimiser step
  teacher_train.log_every = 50  # steps between metric writes
  teacher_train.checkpoint_every = 500  # steps between checkpoints
  teacher_train.keep_checkpoints = 3  # checkpoints kept
  teacher_train.sample_every = 0  # steps between sample grids (0 = off)
  teacher_train.fsdp = False  # shard parameters and optimiser state over devices

  # --- teacher trajectories: PF-ODE solves (mode generate) -------------------
  config.trajectory = trajectory = ml_collections.ConfigDict()
  trajectory.save_times = (0.5625, 0.25, 0.0625, 0.0)  # t in [0, 1] of the K outputs ("quad")
  # ddim | dpmpp2m | dpmpp3m (DPM-Solver++, Lu et al. 2022) | phi2m | phi3m (the multistep
  # variant interpolating in the VP angle, dsno_jax/ode.py) | tsit5 | dopri5 | dopri8 (adaptive)
  trajectory.solver = "ddim"
  trajectory.num_steps = 512  # fixed-step solvers: steps from t=1 to t=0
  trajectory.grid = "uniform_t"  # uniform_t | uniform_logsnr | edm
  trajectory.rtol = 1e-5  # adaptive solvers
  trajectory.atol = 1e-5  # adaptive solvers
  trajectory.num_examples = 1024  # trajectories to generate
  trajectory.batch_size = 256  # global batch of the generation (examples)
  trajectory.shard_size = 256  # examples per written shard (resume granularity)
  trajectory.targets_dtype = "float16"  # "float16" | "float32" storage of the targets
  trajectory.dir = ""  # "" = WORKDIR/trajectories

  # --- DSNO student training (mode train) -------------------------------------
  config.train = train = ml_collections.ConfigDict()
  train.batch_size = 64  # global batch (examples)
  train.num_steps = 1000  # optimiser steps
  train.learning_rate = 2e-4  # peak Adam learning rate
  train.b1 = 0.9
  train.b2 = 0.999
  train.eps = 1e-8
  train.warmup_steps = 100  # linear warm-up from warmup_init * lr (steps)
  train.warmup_init = 1e-3  # warm-up starts at this fraction of the learning rate
  train.milestones = ()  # steps at which the learning rate is multiplied by decay
  train.decay = 0.5  # factor applied at each milestone
  train.ema_decay = 0.9999  # EMA of parameters, per step
  train.grad_clip = 0.0  # global-norm clip (0 = off)
  train.grad_accum = 1  # micro-batches per optimiser step
  # "l1" | "l2" | "vgg" (lpips.LPIPS(net='vgg', lpips=False): DSNO's CIFAR-10 loss) | "lpips"
  train.loss = "l2"
  train.perceptual_weights = ""  # losses vgg/lpips: converted .npz of VGG16 (+ LPIPS heads)
  train.time_weighting = "uniform"  # "uniform" | "snr" (clip(exp(lam/2), 1, 1e4))
  train.init_from_teacher = True  # copy teacher weights into the student
  train.log_every = 50  # steps between metric writes
  train.checkpoint_every = 500  # steps between checkpoints
  train.keep_checkpoints = 3  # checkpoints kept
  train.sample_every = 0  # steps between sample grids (0 = off)
  train.fsdp = False  # shard parameters and optimiser state over devices

  # --- distribution-matching refinement of the student's one-step output (mode refine) -------
  # DMD (Yin et al. 2024): a fake denoiser, initialised from the teacher, learns the student's
  # t=0 samples with the teacher's loss; the student moves along w (x_fake - x_real) at
  # z_t = alpha_t x + sigma_t eps. Starts from WORKDIR/export, writes WORKDIR/export_refined.
  # The optimiser defaults are DMD2's (github.com/tianweiy/DMD2, main/edm/train_edm.py and
  # experiments/imagenet/*.sh; configs/cifar10.py and imagenet64.py add its batch, length and
  # GAN term); configs/digits.py has its own, tuned on the digits.
  config.refine = refine = ml_collections.ConfigDict()
  refine.in_pipeline = False  # run the refine stage in --mode=pipeline (after export)
  refine.batch_size = 64  # global batch of generator samples (examples)
  refine.num_steps = 400  # optimiser steps, fake-denoiser and generator updates counted together
  refine.fake_steps = 5  # fake-denoiser updates per generator update (DMD2's ImageNet-64: 5)
  refine.learning_rate = 2e-6  # the generator's (student's) AdamW learning rate, constant
  refine.fake_learning_rate = 2e-6  # the fake denoiser's AdamW learning rate, constant
  refine.b1, refine.b2, refine.eps = 0.9, 0.999, 1e-8  # AdamW of both (DMD2: PyTorch's defaults)
  refine.weight_decay = 0.01  # AdamW's decoupled weight decay, per unit learning rate (0 = Adam)
  refine.grad_clip = 10.0  # global-norm clip of each half's gradient (0 = off; DMD2: 10)
  refine.grad_accum = 1  # micro-batches per optimiser step
  # EMA of the generator, per step (the refined export is the EMA); decay min(ema_decay,
  # (1 + n) / (10 + n)) at update n; 0 = no EMA, the export is the generator (DMD2 keeps none)
  refine.ema_decay = 0.0
  # t range of the distribution-matching noise, in [0, 1] of the cosine schedule (DMD and DMD2:
  # 0.02-0.98 of their noise levels); the fake denoiser trains on the whole range t ~ U(0, 1)
  refine.t_min, refine.t_max = 0.02, 0.98
  refine.dmd_weighting = "dmd"  # "dmd" (1 / mean|x - x_real| per example) | "uniform"
  # the fake denoiser's loss, as teacher.train's (DMD2 weights its x error by SNR + 4, EDM's)
  refine.fake_loss_weighting = "snr_trunc"
  # DSNO's trajectory loss (train.loss, train.time_weighting) on the trajectory dataset, kept as
  # a regulariser (DMD's regression term) times this weight; 0 = off, the trajectories unread
  refine.regression_weight = 0.0
  # DMD2's GAN term on real images (Sec. 4.3), off by default: a classifier head on the fake
  # denoiser's middle features tells noised real images (data.train_split) from noised samples.
  # Its loss, times gan_discriminator_weight (dimensionless, relative to the fake denoiser's
  # loss; DMD2's ImageNet-64 run: 1e-2), trains the head and the fake backbone at the fake
  # denoiser's learning rate and time-scale; 0 = no GAN term at all (no head, no real images)
  refine.gan_discriminator_weight = 0.0
  # the generator's adversarial loss, times this (dimensionless, relative to its DMD loss;
  # DMD2's ImageNet-64 run: 3e-3), joins its loss; needs gan_discriminator_weight > 0; 0 = off
  refine.gan_weight = 0.0
  # the GAN term's noise: t ~ U(0, gan_t_max) of the cosine schedule (DMD2: all of its levels)
  refine.gan_t_max = 1.0
  refine.gan_loss = "non_saturating"  # "non_saturating" (DMD2's) | "hinge"
  refine.log_every = 50  # steps between metric writes
  refine.checkpoint_every = 200  # steps between checkpoints
  refine.keep_checkpoints = 2  # checkpoints kept
  refine.sample_every = 0  # steps between sample grids (0 = off)
  refine.fsdp = False  # shard parameters and optimiser state over devices

  # --- evaluation (mode evaluate) --------------------------------------------
  config.eval = evaluation = ml_collections.ConfigDict()
  evaluation.num_samples = 1000  # samples per metric
  evaluation.batch_size = 250  # global batch of sampling
  # The teacher rows of the table, each "SOLVER:N1,N2,..." : a fixed-step solver (uniform-t
  # grid) at those NFEs (network evaluations per sample, exactly), or "SOLVER:TOL" for an
  # adaptive one (tsit5 | dopri5 | dopri8) at rtol = atol = TOL, whose mean NFE is measured.
  # () = the student alone (e.g. --config.eval.teacher_rows="()").
  evaluation.teacher_rows = ("ddim:1,2,4,8,16,64", "dpmpp2m:2,4,8,16,64",
                             "phi2m:2,4,8,16,64", "dopri5:1e-4")
  evaluation.save_png = False  # also write the samples as a folder of PNGs (EDM's fid.py reads one)
  # Memorisation check: each sample's distance to its nearest training image in the metric's
  # feature space, against the held-out eval split's; keeps the train split's features in
  # host memory (50k x 2048 floats for CIFAR-10), so off by default
  evaluation.memorization = False
  evaluation.classifier_steps = 600  # optimiser steps of the FD-digits classifier
  # Seed of the FD-digits classifier, fixed apart from config.seed so that runs with different
  # seeds are scored by the same features and their FD-digits compare.
  evaluation.classifier_seed = 0
  evaluation.reference_stats = ""  # .npz with mu and sigma; "" = computed from data
  evaluation.inception_weights = ""  # converted inception_fid.npz

  # --- several processes (jax.distributed); unset = environment / auto-detection ----------
  config.distributed = distributed = ml_collections.ConfigDict()
  distributed.coordinator_address = ""  # "host:port" of process 0 ("" = JAX_COORDINATOR_ADDRESS)
  distributed.num_processes = 0  # processes in the run (0 = JAX_NUM_PROCESSES or auto-detect)
  distributed.process_id = -1  # this process (-1 = JAX_PROCESS_ID or auto-detect)

  config.profile = False  # write a jax.profiler trace of a few steps
  # seconds between uploads of a gs:// workdir's TensorBoard events (also uploaded at the end)
  config.tensorboard_upload_every_s = 300.0
  return config
