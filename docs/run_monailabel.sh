#!/usr/bin/env bash
# Serve a VESSA bundle in MONAI Label (the `monaibundle` sample app, with tools/monailabel_app/main.py on top so a
# failed request gets an HTTP error with its reason), for 3D Slicer, OHIF or any HTTP client.
#
#   bash docs/run_monailabel.sh STUDIES_DIR [PORT]
#
# STUDIES_DIR holds NIfTI volumes (*.nii.gz); labels saved from a viewer go to STUDIES_DIR/labels/final, and MONAI
# Label's training request trains on those image/label pairs. The bundle needs models/model.pt (train it first, or
# copy a trained one there). Settings from the environment:
#   BUNDLE_DIR   bundle folder to serve (default: bundles/vessa_ssl_acdc of this repository); its folder name is the
#                model name in MONAI Label (/infer/<name>, /train/<name>)
#   APP_DIR      where the app is put (default: .venv-monailabel/apps/vessa)
#   HOST         address to listen on (default 127.0.0.1)
#
# MONAI Label conflicts with the main .venv, so it lives in its own environment (.venv-monailabel), created on first
# use by tools/install_monailabel.sh. `--conf sam2 false` keeps the server from downloading a SAM2 model at start and
# `--conf zoo_source github` from asking the Model Zoo's index for the (local) bundle.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
STUDIES="${1:?usage: bash docs/run_monailabel.sh STUDIES_DIR [PORT]}"
PORT="${2:-8000}"
HOST="${HOST:-127.0.0.1}"
BUNDLE_DIR="$(cd "${BUNDLE_DIR:-$REPO/bundles/vessa_ssl_acdc}" && pwd)"
APP_DIR="${APP_DIR:-$REPO/.venv-monailabel/apps/vessa}"
PY="$REPO/.venv-monailabel/bin/python"
MODEL="$(basename "$BUNDLE_DIR")"

bash "$REPO/tools/install_monailabel.sh"
if [ ! -f "$BUNDLE_DIR/models/model.pt" ]; then
    echo "no $BUNDLE_DIR/models/model.pt: train the bundle first (see README.md)" >&2
    exit 1
fi
if [ ! -f "$APP_DIR/monaibundle_main.py" ]; then
    # the sample apps ship inside the monailabel package: this copies one, no download
    SAMPLES="$(mktemp -d)"
    "$PY" -m monailabel.main apps --download --name monaibundle --output "$SAMPLES"
    mkdir -p "$(dirname "$APP_DIR")"
    rm -rf "$APP_DIR"
    mv "$SAMPLES/monaibundle" "$APP_DIR"
    mv "$APP_DIR/main.py" "$APP_DIR/monaibundle_main.py"
    rm -rf "$SAMPLES"
fi
cp "$REPO/tools/monailabel_app/main.py" "$APP_DIR/main.py"
mkdir -p "$APP_DIR/model" "$STUDIES"
ln -sfn "$BUNDLE_DIR" "$APP_DIR/model/$MODEL"
exec "$PY" -m monailabel.main start_server --app "$APP_DIR" --studies "$STUDIES" \
    --conf models "$MODEL" --conf sam2 false --conf zoo_source github --host "$HOST" --port "$PORT"
