#!/usr/bin/env bash
# Validates packaging/daemonset.yaml against the Kubernetes API schema, strictly
# (unknown fields are errors), with kubernetes-validate from PyPI (it ships the
# schemas; kubeconform and kubeval are not packaged by Debian). The tool lives in a
# virtualenv outside the checkout.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${KV_VENV:-/var/cache/flowd-rs-kubernetes-validate}
if [ ! -x "$venv/bin/kubernetes-validate" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q kubernetes-validate
fi
"$venv/bin/kubernetes-validate" --strict packaging/daemonset.yaml
