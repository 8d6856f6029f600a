# The image launch/kubernetes.yaml runs: skymoe-jax with JAX's CUDA 12 wheels (CUDA, cuDNN and NCCL
# arrive as pip packages, so the node needs only an NVIDIA driver and the NVIDIA container toolkit).
#
#   docker build -t skymoe-jax:0.1.0 .
#   docker run --gpus all --shm-size=16g -v "$PWD/runs:/workspace/runs" skymoe-jax:0.1.0 \
#       skymoe train --config=configs/gpu_medium.py
#
# Push it to a registry the cluster pulls from and name it in launch/kubernetes.yaml.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/skymoe-jax
COPY . .
# A regular (not editable) install: the configs travel inside the package, so `--config=configs/x.py`
# finds the built-in ones from any directory.
RUN pip install '.[cuda]' && skymoe --help > /dev/null

# Relative workdirs (the default runs/<config name>) land here; mount shared storage on it.
WORKDIR /workspace
CMD ["skymoe", "train", "--config=configs/gpu_medium.py"]
