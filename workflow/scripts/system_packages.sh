#!/usr/bin/env bash
# System packages some tests use: Debian's slurm-wlm + munge (a real Slurm) and chromium +
# chromium-driver (the MLflow UI in a browser). Installs the missing ones with apt as root;
# otherwise names them, and the tests that need them fail saying so.
set -euo pipefail

declare -A PACKAGE=([sbatch]=slurm-wlm [slurmctld]=slurm-wlm [munged]=munge [chromium]=chromium [chromedriver]=chromium-driver)
missing=()
for command in "${!PACKAGE[@]}"; do
    command -v "$command" >/dev/null || missing+=("${PACKAGE[$command]}")
done
[[ ${#missing[@]} == 0 ]] && exit 0
mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
    echo "installing ${missing[*]} (apt)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null
else
    echo "missing system packages: ${missing[*]}; install them as root (apt-get install -y ${missing[*]})" >&2
fi
