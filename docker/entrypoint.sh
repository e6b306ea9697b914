#!/bin/sh
# `docker run viker precompute ...` runs the viker CLI; a first argument that is
# another launcher (torchrun, accelerate, python, bash, ...) runs as given, so
# multi-GPU jobs work in the container:
#   docker run --gpus all viker torchrun --nproc_per_node 4 -m pipeline.cli train --config ...
#   docker run --gpus all viker accelerate launch -m pipeline.cli train --config ...
set -e
case "${1:-}" in
    torchrun|accelerate|python|python3|bash|sh|viker) exec "$@" ;;
    *) exec viker "$@" ;;
esac
