# Sourced by the scripts: where the project's virtual environment lives.
# One per user and torch pin, outside the work tree, so clones, worktrees and CI
# runs on one machine share the 4.6 GB install (scripts/setup.sh makes it).
# GSTVAE_VENV overrides it.
GSTVAE_TORCH_PIN=$(sed -n 's/^torch==//p' "$(dirname "${BASH_SOURCE[0]}")/requirements.txt")
# HOME may be unset (a bare CI environment): the user's home from passwd then.
gstvae_home=${HOME:-$(getent passwd "$(id -u)" | cut -d: -f6)}
GSTVAE_VENV=${GSTVAE_VENV:-${XDG_CACHE_HOME:-$gstvae_home/.cache}/gst-vae/venv-torch-$GSTVAE_TORCH_PIN}
GSTVAE_PYTHON=$GSTVAE_VENV/bin/python3
