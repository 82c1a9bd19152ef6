#!/usr/bin/env bash
# Create ./.venv-monailabel: MONAI Label and this project (editable) in their own environment.
# MONAI Label conflicts with the main .venv (it pins numpy < 2 and old pydicom/pynetdicom/dicomweb-client), so it
# never shares it. Safe to run again: an environment built from the same setup.cfg and script is left as it is.
# Usage: bash tools/install_monailabel.sh [VENV_DIR]   (default: .venv-monailabel in the repository root)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.venv-monailabel}"
MONAILABEL_VERSION="0.8.5"
# what the environment was built from: a change of these files rebuilds it
STAMP="$(cat setup.cfg tools/install_monailabel.sh | sha1sum | cut -d' ' -f1)"
if [ -x "$VENV/bin/python" ] && [ "$(cat "$VENV/.vessa_install_stamp" 2>/dev/null)" = "$STAMP" ]; then
    exit 0
fi
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
PIP=("$VENV/bin/pip" install -q --disable-pip-version-check)
"${PIP[@]}" "setuptools>=61" wheel torch torchvision
# One resolution for MONAI Label and this package; the three DICOM pins are what monailabel 0.8.5 needs to import.
# sam2 (a dependency of this package) builds without its optional CUDA extension and against the torch above.
SAM2_BUILD_CUDA=0 "${PIP[@]}" --no-build-isolation \
    "monailabel==${MONAILABEL_VERSION}" "pydicom>=2.4,<3" "pynetdicom>=2.0.2,<3" "dicomweb-client>=0.59.1,<0.60" \
    -e .
"$VENV/bin/python" -c "import monailabel, vessa_components; print('monailabel', monailabel.__version__)"
echo "$STAMP" > "$VENV/.vessa_install_stamp"
