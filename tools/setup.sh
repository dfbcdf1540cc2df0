#!/usr/bin/env bash
# Everything a fresh Debian machine needs, idempotent: Debian packages, .venv with the pinned wheels.
# Re-running is cheap: each step is skipped when its result is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

# Speech synthesis for the embedded corpus; a C++ toolchain and Boost for KenLM's lmplz (tools/train_ngram.py).
APT_PACKAGES=(espeak-ng flite festival festvox-kallpc16k wordnet-base cmake g++ libboost-program-options-dev
              libboost-system-dev libboost-thread-dev libboost-test-dev)
missing=()
for p in "${APT_PACKAGES[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=$([ "$(id -u)" = 0 ] && echo "" || echo sudo)
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "${missing[@]}"
fi

stamp=.venv/.installed-$(sha1sum pyproject.toml | cut -c1-12)
if [ ! -f "$stamp" ]; then
  python3 -m venv .venv
  .venv/bin/pip install -q --upgrade pip
  # torch first (CUDA build; it also runs without a GPU), then DeepSpeed without prebuilt ops.
  .venv/bin/pip install -q torch==2.11.0 torchaudio==2.11.0
  DS_BUILD_OPS=0 .venv/bin/pip install -q -e '.[test]'
  touch "$stamp"
fi
