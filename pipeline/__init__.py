"""viker: machine unlearning for LLaVA-style models (stage one, the cache, stage two, evaluation)."""
import os as _os

# Threads that wait for work sleep instead of spinning. On a 2-core machine busy with other jobs a
# spinning OpenMP team starves itself: measured at load ~3.5, one fine-tuning step of the tiny model
# took 0.82 s with spinning (the default) and 0.21 s with OMP_WAIT_POLICY=PASSIVE; one demo run
# (train + evaluate) 31.1 s vs 9.9 s. It must be set before torch loads its OpenMP runtime; an
# explicit value in the environment wins.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
