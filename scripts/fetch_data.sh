#!/usr/bin/env bash
# Fetch Debian's dataset-fashion-mnist package (real images, IDX files) into the
# visionmoe data cache without installing it system-wide. Needs apt and the
# Debian archive; does nothing if the files are already there.
set -euo pipefail
CACHE=${1:-$HOME/.cache/visionmoe}
DEST="$CACHE/fashion_mnist"
if ls "$DEST"/*train-images* >/dev/null 2>&1; then exit 0; fi
if ls /usr/share/datasets/fashion-mnist/*train-images* >/dev/null 2>&1; then exit 0; fi
command -v apt-get >/dev/null || { echo "[data] apt-get not found"; exit 1; }
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
( cd "$TMP" && apt-get download dataset-fashion-mnist >/dev/null 2>&1 ) || {
    apt-get update >/dev/null 2>&1 || true
    ( cd "$TMP" && apt-get download dataset-fashion-mnist >/dev/null )
}
dpkg -x "$TMP"/dataset-fashion-mnist_*.deb "$TMP/x"
mkdir -p "$DEST"
find "$TMP/x" -name '*-ubyte*' -exec cp {} "$DEST"/ \;
echo "[data] Fashion-MNIST -> $DEST"
