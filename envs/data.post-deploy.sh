#!/usr/bin/env bash
# Snakemake runs this inside the new env, from the repository root: install visionqc itself (editable).
set -euo pipefail
python -m pip install --no-deps --no-build-isolation -e .
