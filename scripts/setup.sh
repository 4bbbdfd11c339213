#!/usr/bin/env bash
# Install everything raycompat needs on a fresh Debian machine (idempotent):
# Debian's Fashion-MNIST (the offline dataset) and Chromium (renders the HTML
# report in a test), then the package and its test extra with pip.
set -euo pipefail
cd "$(dirname "$0")/.."

apt_pkgs=()
[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || apt_pkgs+=(dataset-fashion-mnist)
command -v chromium >/dev/null 2>&1 || apt_pkgs+=(chromium)
if [ ${#apt_pkgs[@]} -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: apt-get install ${apt_pkgs[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${apt_pkgs[@]}" >/dev/null
  else
    echo "setup: please install Debian packages: ${apt_pkgs[*]} (the demo falls back to scikit-learn's digits)" >&2
  fi
fi

PYTHON=${PYTHON:-python3}
# Skip pip when this checkout is already installed (editable) and its
# dependencies resolve (fast re-runs); `import raycompat` alone would succeed
# from the checkout directory even on a fresh machine.
if ! "$PYTHON" - <<'PY' 2>/dev/null
import importlib.metadata as md, json, pathlib, sys
here = pathlib.Path.cwd().resolve().as_uri()
urls = {json.loads(d.read_text("direct_url.json") or "{}").get("url") for d in md.distributions(name="raycompat")}
import faiss, optuna, pyarrow, ray, torch, torchvision, pytest, moto.server  # noqa: F401
sys.exit(0 if here in urls else 1)
PY
then
  echo "setup: pip install -e .[test]"
  "$PYTHON" -m pip install -q -e ".[test]"
fi
"$PYTHON" -m pip check >/dev/null || "$PYTHON" -m pip install -q -e ".[test]"
