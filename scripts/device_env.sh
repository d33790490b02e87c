#!/usr/bin/env bash
# Make `apb` (with apb.kernels / apb.train / apb.data) importable from this checkout without pip, for a
# machine whose Python already has torch and transformers (the GPU machine): source it from the repo root.
#   source scripts/device_env.sh
set -e
_root=$(pwd)
_site=${APB_SITE:-/tmp/apb-site}
rm -rf "$_site" && mkdir -p "$_site/apb"
for f in "$_root"/apb/*; do ln -s "$f" "$_site/apb/"; done
ln -s "$_root/kernels" "$_site/apb/kernels"
ln -s "$_root/train" "$_site/apb/train"
ln -s "$_root/data" "$_site/apb/data"
export PYTHONPATH="$_site${PYTHONPATH:+:$PYTHONPATH}"
set +e
