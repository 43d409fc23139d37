"""Installs dsno_jax: DSNO (one-step diffusion sampling by operator learning) in JAX/Flax."""
import setuptools

INSTALL_REQUIRES = [
    # the oldest JAX tested; the code calls jax.shard_map(..., check_vma=...)
    "jax>=0.10.2",
    "flax>=0.8",
    "optax",
    "orbax-checkpoint",
    "ml-collections",
    # ode.py reports adaptive solvers' NFE from diffrax's step counts and internals, counted
    # against a callback in tests/test_ode.py on these versions only.
    "diffrax>=0.7.2,<0.7.3",
    "clu",
    "tensorflow-datasets",
    # clu's metric writers and periodic actions import TensorFlow and tensorboard.
    "tensorflow-cpu",
    "tensorboard",
    "array-record",
    # the input pipeline: global shuffling, per-process sharding, worker processes, checkpoints
    "grain",
    "chex",
    "einops",
    "absl-py",
    "numpy",
    "scipy",
    "pillow",
    "matplotlib",
    # The embedded default data set (8x8 digits) ships inside scikit-learn.
    "scikit-learn",
    # gs:// paths: etils.epath reaches Cloud Storage through gcsfs (TPU VMs have no TensorFlow
    # GCS client to fall back on when tensorflow-cpu is absent or pointed at an emulator), and
    # the workdir lock needs google-cloud-storage's generation preconditions. Both are small
    # and every launcher here writes to a bucket, so they are required, not an extra.
    "gcsfs",
    "google-cloud-storage",
]

TEST_REQUIRES = [
    "pytest",
    "pytest-timeout",
    # tests/test_inception.py compares the Flax Inception with pytorch-fid's (random weights).
    "torch==2.14.1",
    "torchvision==0.29.1",
    "pytorch-fid",
    # tests/test_import_dsno_lmdb.py writes a DSNO-pytorch trajectory database.
    "lmdb",
    # tests/test_perceptual.py compares LPIPS and the VGG feature distance with the lpips package.
    "lpips",
    # tests/test_gcs.py runs gs:// workdirs against this Cloud Storage emulator on loopback,
    # patching one of its download handlers (the version it was written against).
    "gcp-storage-emulator==2026.7.19",
]

setuptools.setup(
    name="dsno_jax",
    version="0.1.0",
    description="DSNO: fast sampling of diffusion models via operator learning, in JAX/Flax.",
    packages=setuptools.find_packages(include=["dsno_jax", "dsno_jax.*", "configs"]),
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require={"test": TEST_REQUIRES,
                    # python -m dsno_jax.data.import_dsno_lmdb reads DSNO-pytorch's databases.
                    "lmdb": ["lmdb"],
                    # Cloud TPU VMs: pip install -e ".[tpu]" (libtpu from PyPI)
                    "tpu": ["jax[tpu]>=0.10.2"],
                    # NVIDIA GPUs: CUDA 12 wheels (pip-installed CUDA libraries; drivers >= 525),
                    # which run on far more clusters' drivers today than the CUDA 13 ones (>= 580)
                    "cuda": ["jax[cuda12]>=0.10.2"]},
)
