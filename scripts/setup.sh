#!/usr/bin/env bash
# Idempotent set-up on a fresh machine: system data packages (as root) and the project's venv.
# Usage: source-free; called by scripts/quickstart.sh and scripts/test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

# Fashion-MNIST ships as a Debian package (offline-friendly data for tests and configs).
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  echo "[setup] apt-get install dataset-fashion-mnist"
  apt-get update -qq || true
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends dataset-fashion-mnist >/dev/null \
    || echo "[setup] warning: dataset-fashion-mnist could not be installed; Fashion-MNIST tests will fail"
fi

# The venv is reinstalled only when pyproject.toml or constraints.txt changed (a stamp of both).
# Always with -c constraints.txt: the tested versions, including the pair torch 2.14.1 +
# torchvision 0.29.1 (the [vision] extra, so that the torchvision tests run in CI).
stamp=.venv/.installed-$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ]; then
  echo "[setup] creating .venv and installing hawq[dev,vision] with the versions of constraints.txt"
  [ -x .venv/bin/python ] || "$PY" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip==25.3
  .venv/bin/python -m pip install -q -c constraints.txt -e '.[dev,vision]'
  rm -f .venv/.installed-*
  touch "$stamp"
fi
