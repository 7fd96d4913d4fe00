# The two set-up commands: `make demo` and `make test`. Both create or reuse .venv.
VENV ?= .venv
PY := $(VENV)/bin/python
# XTuner V1 at commit b934f46, installed --no-deps (its pins conflict with ms-swift): the offline wheel
# beside the checkout when present, else from Git.
XTUNER_WHEEL ?= ../shared/wheels/xtuner-v1/xtuner-0.2.0-py3-none-any.whl
XTUNER_GIT := xtuner @ git+https://github.com/InternLM/xtuner@b934f462095c1e750229de35367c50ae36caa786
XTUNER := $(if $(wildcard $(XTUNER_WHEEL)),$(XTUNER_WHEEL),$(XTUNER_GIT))
STAMP := $(VENV)/.installed-$(shell (cat requirements.txt pyproject.toml; echo '$(XTUNER)') | sha256sum | cut -c1-12)

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export MLFLOW_DISABLE_TELEMETRY := true
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: venv system demo demo-dense test bench clean

venv: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps "$(XTUNER)"
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	rm -f $(VENV)/.installed-*
	touch $@

# slurm-wlm, munge, chromium, chromium-driver for the Slurm and MLflow-UI tests (apt, as root)
system:
	bash workflow/scripts/system_packages.sh

demo: venv
	snakemake --profile workflow/profiles/local
	@$(PY) -m visionqc.cli where --results results

# The demo's dense run (config/demo_dense.yaml): its own fusion and run, then its eval_dense figure.
demo-dense: venv
	snakemake results/eval_dense/demo_dense/metrics.json --profile workflow/profiles/local --configfile=config/demo_dense.yaml
	@$(PY) -m visionqc.cli where --results results

test: venv system
	$(PY) -m pytest

bench: venv
	$(PY) bench/validate_throughput.py

clean:
	rm -rf results logs .snakemake
