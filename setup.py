"""Installs dsno_jax: DSNO (one-step diffusion sampling by operator learning) in JAX/Flax."""
import setuptools

INSTALL_REQUIRES = [
    "jax>=0.4.30",
    "flax>=0.8",
    "optax",
    "orbax-checkpoint",
    "ml-collections",
    "diffrax",
    "clu",
    "tensorflow-datasets",
    # clu's metric writers and periodic actions import TensorFlow and tensorboard.
    "tensorflow-cpu",
    "tensorboard",
    "array-record",
    "chex",
    "einops",
    "absl-py",
    "numpy",
    "scipy",
    "pillow",
    "matplotlib",
    # The embedded default data set (8x8 digits) ships inside scikit-learn.
    "scikit-learn",
]

TEST_REQUIRES = [
    "pytest",
    "pytest-timeout",
    # tests/test_inception.py compares the Flax Inception with pytorch-fid's (random weights).
    "torch==2.14.1",
    "torchvision==0.29.1",
    "pytorch-fid",
    # tests/test_perceptual.py compares LPIPS and the VGG feature distance with the lpips package.
    "lpips",
]

setuptools.setup(
    name="dsno_jax",
    version="0.1.0",
    description="DSNO: fast sampling of diffusion models via operator learning, in JAX/Flax.",
    packages=setuptools.find_packages(include=["dsno_jax", "dsno_jax.*", "configs"]),
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require={"test": TEST_REQUIRES},
)
