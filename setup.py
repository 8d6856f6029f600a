from setuptools import find_packages, setup

setup(
    name="skymoe-jax",
    version="0.1.0",
    description="A JAX/Flax trainer for Mixture-of-Experts language models implementing Skywork-MoE's techniques",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["skymoe_jax", "skymoe_jax.*"]) + ["skymoe_jax.configs"],
    # configs/ lives at the top level of the repository; wheels carry it inside the package.
    package_dir={"skymoe_jax.configs": "configs"},
    package_data={
        "skymoe_jax.configs": ["*.py", "experiments/*.py"],
        "skymoe_jax.kernels": ["*.cc", "*.h"],
        "skymoe_jax.parallel": ["gpu_targets/*.txtpb"],
    },
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11",
        "etils[epath]",  # imported directly by the checkpoint manager (orbax brings it too, today)
        "grain>=0.2.12",
        "array-record>=0.5",  # prepared-data shards (skymoe prepare-data, data.source=prepared)
        "ml-collections>=1.0",
        "absl-py",
        "numpy",
        "rich",
        "tokenizers",
        "safetensors",
        "filelock>=3",  # JAX locks a size-bounded compilation cache with it (run/compile_cache.py, the tests' cache)
        "scipy-openblas64",  # the BLAS of the CPU weight-gradient kernel (kernels/cpu_matmul.py), apart from numpy's
        # TensorBoard's event protos and record writer (metrics/tensorboard.py; the version the tests have seen)
        "tensorboard>=2.21",
    ],
    # JAX versions the tests have seen: 0.10.2 (CPU, CI); not yet the GPU machine's 0.11.2. No upper bound: none is
    # known to break.
    extras_require={
        # NVIDIA GPUs: JAX's CUDA 12 wheels (CUDA, cuDNN and NCCL as pip packages; the host needs only a driver).
        "cuda": ["jax[cuda12]>=0.10.2"],
        # Compiling for GPUs without one (`skymoe params --compile=A800-80GB`, the XLA:GPU tests): JAX's CUDA plugin
        # at jaxlib's version, without CUDA's libraries; run it with JAX_PLATFORMS=cpu where there is no GPU.
        "aot": ["jax[cuda12-local]>=0.10.2"],
        # Experiment trackers (metrics.wandb, metrics.mlflow; docs/trackers.md), at the versions the tests have seen.
        # MLflow's client without its server and UI: a run logs to a tracking server or a local store.
        "wandb": ["wandb>=0.31"],
        "mlflow": ["mlflow-skinny>=3.18"],
        # Workdirs on object storage (checkpoint/storage.py; docs/checkpoints.md): the small files through fsspec.
        # Checkpoints go through tensorstore's own s3 and gcs drivers; fsspec and s3fs at the versions tests have seen.
        "s3": ["fsspec>=2026.9", "s3fs>=2026.9"],
        "gcs": ["fsspec>=2026.9", "gcsfs"],
        # `skymoe report` and the figures in the notebook.
        "report": ["matplotlib>=3.8"],
        # notebooks/quickstart.ipynb: figures, and ipywidgets for rich's progress bar in Jupyter.
        "notebook": ["matplotlib>=3.8", "ipywidgets>=8"],
        # The tests also execute the notebook headless (nbclient on an ipykernel).
        "test": [
            "pytest",
            "pytest-xdist>=3",
            "matplotlib>=3.8",
            "ipywidgets>=8",
            "nbclient>=0.10",
            "nbformat>=5.10",
            "ipykernel>=6",
            "pyyaml>=6",
            "ruff>=0.6",
            "s3fs>=2026.9",
            "moto[server]>=5.2",
        ],  # pytest-xdist: the README's command runs the tests in 2 processes; pyyaml: tests/test_launch.py reads
        # the Kubernetes manifest; ruff: test_lint; s3fs and moto's S3 server: tests/test_object_store.py
        # Only for tests/test_hf_import.py, which compares imported models with transformers' PyTorch ones.
        "hf": ["torch>=2.4", "transformers>=4.45"],
    },
    entry_points={"console_scripts": ["skymoe = skymoe_jax.cli:main"]},
)
