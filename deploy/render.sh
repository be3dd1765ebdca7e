#!/usr/bin/env bash
# Renders deploy/iot-operator.yaml (for `kubectl apply -f`) from the Helm chart's defaults.
set -euo pipefail
cd "$(dirname "$0")/.."
HELM="${IOT_OPERATOR_TEST_HELM:-$(command -v helm || echo .cache/bin/helm)}"
{
  printf '# Rendered from charts/iot-operator with default values: `bash deploy/render.sh`.\n---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: iot-operator\n'
  "$HELM" template iot-operator charts/iot-operator --namespace iot-operator --include-crds
} > deploy/iot-operator.yaml
