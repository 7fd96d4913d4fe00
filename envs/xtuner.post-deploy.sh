#!/usr/bin/env bash
# Snakemake runs this inside the new env, from the repository root: XTuner V1 at the pinned commit
# without its dependency pins (they conflict with ms-swift), then visionqc itself (editable).
# Offline sites set VISIONQC_XTUNER_WHEEL to a wheel built from the same commit.
set -euo pipefail
python -m pip install --no-deps "${VISIONQC_XTUNER_WHEEL:-xtuner @ git+https://github.com/InternLM/xtuner@b934f462095c1e750229de35367c50ae36caa786}"
python -m pip install --no-deps --no-build-isolation -e .
