# Airflow orchestration (included from the Makefile). Airflow lives in its own venv, without torch; its tasks
# call the main venv's `birdbone` CLI (Variable birdbone_cli), exactly as a deployment calls the image's.
#   make airflow-venv    .venv-airflow from the committed lock requirements/airflow.txt
#   make test-airflow    the DAG tests (DagBag, dag.test end to end, pod specs, real Airflow + UI, nightly)
#   make demo-airflow    birdbone_compress once with dag.test() on MODEL/RECIPE; prints GGUF/ledger/report
#                        (SIZE=100MB or SIZE=40%: quantize the GGUF to that file size)
VENV_AIRFLOW ?= .venv-airflow
AIRFLOW_PY   := $(VENV_AIRFLOW)/bin/python
UI_TEST_DIR  := tests/dags/ui
DEMO_MODEL   ?=
DEMO_RECIPE  ?= birdbone_core/recipes/demo.yaml
DEMO_RUN_ID  ?= demo-airflow
SIZE         ?=

.PHONY: airflow-venv test-airflow demo-airflow

$(VENV_AIRFLOW)/.stamp: requirements/airflow.txt $(LOCK)
	$(PYTHON) -m venv $(VENV_AIRFLOW)
	$(VENV_AIRFLOW)/bin/pip install -q "pip==$(PIP_VERSION)"
	$(VENV_AIRFLOW)/bin/pip install -q -r requirements/airflow.txt
	touch $@

$(UI_TEST_DIR)/node_modules/.stamp: $(UI_TEST_DIR)/package-lock.json
	cd $(UI_TEST_DIR) && npm ci --no-audit --no-fund --loglevel=error
	touch $@

airflow-venv: $(VENV_AIRFLOW)/.stamp

test-airflow: $(VENV_AIRFLOW)/.stamp $(VENV)/.core $(UI_TEST_DIR)/node_modules/.stamp sysdeps
	BIRDBONE_PROGRESS=0 OMP_NUM_THREADS=1 $(AIRFLOW_PY) -m pytest -q -ra tests/dags

demo-airflow: $(VENV_AIRFLOW)/.stamp $(VENV)/.demo
	$(AIRFLOW_PY) dags/run_local.py --recipe "$(DEMO_RECIPE)" --run-id "$(DEMO_RUN_ID)" \
	  $(if $(DEMO_MODEL),--model "$(DEMO_MODEL)") $(if $(SIZE),--size "$(SIZE)") --versus --cli $(BIN)/birdbone
