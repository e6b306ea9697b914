# GPU batch image for viker: `docker build -t viker .`
# Run a stage as a batch job, with the model, data and cache directories as volumes:
#   docker run --gpus all --rm -v $PWD/cache:/work/cache -v /models:/models -v $PWD/hf:/home/viker/.cache/huggingface \
#     viker precompute --config configs/mllmu_10.yaml model.path=/models/llava-1.5-7b-hf
# Multi-GPU (the entrypoint passes torchrun / accelerate through):
#   docker run --gpus all --rm ... viker torchrun --nproc_per_node 4 -m pipeline.cli train --config ...
#   docker run --gpus all --rm ... viker accelerate launch --num_processes 4 -m pipeline.cli train --config ...
#
# The base image's torch is the one the package runs on: transformers 5 needs torch >= 2.6
# and pyproject's floor is this version (tests/test_image.py checks both; `make
# test-image-env` installs the package over this torch version exactly as below).
# CUDA 12.8 runs H100/H200 (and older) with NVIDIA drivers >= 570.
FROM pytorch/pytorch:2.9.0-cuda12.8-cudnn9-runtime

ENV HF_HUB_OFFLINE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HOME=/home/viker/.cache/huggingface \
    MPLBACKEND=Agg

WORKDIR /work
COPY pyproject.toml README.md ./
COPY pipeline ./pipeline
COPY configs ./configs
COPY docker ./docker
# Pins the base image's torch while installing: pip fails rather than replace it.
RUN sh docker/install.sh . && rm -rf build *.egg-info

# Non-root; the cache and HF_HOME are volumes the user owns.
RUN useradd --create-home --uid 1000 viker \
    && mkdir -p /work/cache /home/viker/.cache/huggingface \
    && chown -R viker /work/cache /home/viker
USER viker

VOLUME ["/work/cache", "/home/viker/.cache/huggingface", "/models", "/data"]
ENTRYPOINT ["/work/docker/entrypoint.sh"]
CMD ["--help"]
