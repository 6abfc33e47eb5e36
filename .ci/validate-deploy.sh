#!/usr/bin/env bash
# Validates the Kubernetes manifests offline: no cluster, no schema downloads.
#
#   .ci/validate-deploy.sh [DIR]     (DIR defaults to deploy/kubernetes)
#
# - kubernetes-validate (PyPI; bundles the Kubernetes OpenAPI schemas) checks every core
#   object, secret.example.yaml included, strictly against one Kubernetes version;
# - check-jsonschema checks the KEDA ScaledObject and TriggerAuthentication against
#   deploy/schemas/keda-v1alpha1.schema.json (and that schema against its metaschema);
# - .ci/validate_deploy.py checks the kustomization (every listed file exists, every
#   manifest is listed but the example) and the objects' references to one another;
# - where kubectl is installed, `kubectl kustomize` (offline) must render exactly the
#   listed objects.
# Exits non-zero if anything fails. The tools live in a venv under
# ${XDG_CACHE_HOME:-$HOME/.cache}/taskmill-ci/venv, reinstalled when the pins change.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dir="${1:-$root/deploy/kubernetes}"
schema="$root/deploy/schemas/keda-v1alpha1.schema.json"
# The oldest Kubernetes the manifests claim to support; newer ones accept them too
# (apps/v1, v1 and policy/v1 fields are not removed).
k8s_version="${KUBERNETES_VERSION:-1.30}"
venv="${XDG_CACHE_HOME:-$HOME/.cache}/taskmill-ci/venv"

# Every package pinned, dependencies included, so a run next month checks the same way.
pins="kubernetes-validate==1.37.0
check-jsonschema==0.39.0
jsonschema==4.26.0
jsonschema-specifications==2025.9.1
referencing==0.37.0
rpds-py==2026.9.1
PyYAML==6.0.4
packaging==26.4
importlib_resources==7.1.0
typing_extensions==4.16.0
attrs==26.1.0
click==8.5.1
regress==2026.9.1
ruamel.yaml==0.19.1
requests==2.34.2
certifi==2026.10.19.post1
charset-normalizer==3.5.3
idna==3.20
urllib3==2.8.0"

if [[ ! -x "$venv/bin/python" ]] || [[ "$(cat "$venv/pins.txt" 2>/dev/null)" != "$pins" ]]; then
    echo "== installing the checkers into $venv"
    rm -rf "$venv"
    mkdir -p "$(dirname "$venv")"
    python3 -m venv "$venv"
    printf '%s\n' "$pins" > "$venv/requirements.txt"
    "$venv/bin/pip" install --quiet --disable-pip-version-check --no-input \
        -r "$venv/requirements.txt"
    # Written last: an interrupted install is redone on the next run.
    printf '%s' "$pins" > "$venv/pins.txt"
fi
"$venv/bin/python" -c 'from importlib.metadata import version
print("== checkers:", ", ".join(f"{p} {version(p)}" for p in
      ("kubernetes-validate", "check-jsonschema", "jsonschema")))'

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
status=0

rendered=()
if command -v kubectl >/dev/null 2>&1; then
    echo "== kubectl kustomize $dir"
    if kubectl kustomize "$dir" > "$tmp/rendered.yaml"; then
        rendered=(--rendered "$tmp/rendered.yaml")
    else
        echo "FAIL kubectl kustomize could not render $dir"
        status=1
    fi
else
    echo "== kubectl not installed: the rendering check is skipped"
fi

echo "== kustomization, core objects (Kubernetes $k8s_version, strict) and references"
"$venv/bin/python" "$root/.ci/validate_deploy.py" "$dir" \
    --kubernetes-version "$k8s_version" --keda-list "$tmp/keda.txt" "${rendered[@]}" \
    || status=1

echo "== KEDA schema against its metaschema"
"$venv/bin/check-jsonschema" --check-metaschema "$schema" || status=1

mapfile -t keda_files < <(cat "$tmp/keda.txt" 2>/dev/null)
if ((${#keda_files[@]} == 0)); then
    echo "FAIL no keda.sh/v1alpha1 object found to check"
    status=1
else
    echo "== KEDA objects against $(basename "$schema"):" "${keda_files[@]##*/}"
    "$venv/bin/check-jsonschema" --schemafile "$schema" "${keda_files[@]}" || status=1
fi

if ((status == 0)); then
    echo "deploy manifests: all checks passed"
else
    echo "deploy manifests: FAILED"
fi
exit "$status"
