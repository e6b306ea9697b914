#!/bin/sh
# Install viker into the Python that already carries torch (the Docker base image's,
# or `make test-image-env`'s venv), without replacing or downgrading that torch:
# (read from the package metadata: importing a CUDA torch needs its libraries) a constraints file pins torch to the version found, so any dependency asking for
# another torch makes pip fail instead of silently pulling a different build.
set -eu
src="${1:-.}"
torch_version=$(python -c "import importlib.metadata as m; print(m.version('torch'))")
constraints=$(mktemp)
echo "torch==${torch_version}" > "$constraints"
pip install --no-cache-dir -q -c "$constraints" "$src"
rm -f "$constraints"
after=$(python -c "import importlib.metadata as m; print(m.version('torch'))")
if [ "$after" != "$torch_version" ]; then
    echo "install.sh: torch changed from $torch_version to $after" >&2
    exit 1
fi
echo "install.sh: viker installed over torch $torch_version"
