# GPU batch image for viker: `docker build -t viker .`
# Run a stage as a batch job, with the model, data and cache directories as volumes:
#   docker run --gpus all --rm -v $PWD/cache:/work/cache -v /models:/models \
#     viker precompute --config configs/mllmu_10.yaml model.path=/models/llava-1.5-7b-hf
# The CUDA base image already carries torch; transformers etc. come from pyproject.
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

ENV HF_HUB_OFFLINE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1

WORKDIR /work
COPY pyproject.toml README.md ./
COPY pipeline ./pipeline
COPY configs ./configs
# torch>=2.4 is already satisfied by the base image, so pip keeps its CUDA build.
RUN pip install .

VOLUME ["/work/cache", "/models", "/data"]
ENTRYPOINT ["viker"]
CMD ["--help"]
