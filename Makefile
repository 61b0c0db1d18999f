# Two commands for a newcomer: `make serve` and `make test`. Everything else is optional.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# CPU machines take the CPU wheel of torch (already on disk on these machines); the GPU image
# installs the CUDA build itself (docker/Dockerfile). Never an unpinned torch here.
TORCH_SPEC ?= torch==2.13.0
SHARED ?= ../shared/data

.PHONY: serve test setup lint bench eval demo-model index clean gpu-wheels

$(STAMP): pyproject.toml
	@test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	@touch $(STAMP)

setup: $(STAMP)

serve: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m service

test: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .

eval: $(STAMP)
	$(PY) -m knowledge eval --library $(SHARED)/diseases.jsonl --data $(SHARED)/eval/dxy_dev.jsonl \
		--label-map $(SHARED)/eval/label_map.json
	@echo "dxy_dev as free text, as EHR symptom lists and as structured records, halves a (tuned) and b:"
	@for form in text list structured; do for half in a b; do \
		$(PY) -m knowledge eval --library $(SHARED)/diseases.jsonl --data $(SHARED)/eval/dxy_dev.jsonl \
			--label-map $(SHARED)/eval/label_map.json --form $$form --split $$half --quiet || exit 1; done; done
	@echo "adult complaints (project-written probes: tuned; blind, blind 2 to 5 as totals only):"
	$(PY) -m knowledge eval --library $(SHARED)/diseases.jsonl --data knowledge/data/probes/adult_complaints.jsonl
	@for probe in adult_blind adult_lay_blind2 adult_lay_blind3 adult_lay_blind4 adult_lay_blind5; do $(PY) -m knowledge eval \
		--library $(SHARED)/diseases.jsonl --data knowledge/data/probes/$$probe.jsonl --quiet || exit 1; done
	@echo "dialogue lay: held-out dialogue questions that do not name their disease (the view is built from the rest):"
	@if [ -d $(SHARED)/dialogues ]; then \
		$(PY) -m knowledge eval --library $(SHARED)/diseases.jsonl --data $(SHARED)/dialogues --quiet; \
	else echo "no dialogues folder: dialogue lay set skipped"; fi
	@echo "EHR symptom lists (blind probe), as the list line and as the structured record:"
	@for form in list structured; do $(PY) -m knowledge eval --library $(SHARED)/diseases.jsonl \
		--data knowledge/data/probes/ehr_lists_blind.jsonl --form $$form --quiet || exit 1; done
	$(PY) -m safety eval

bench: $(STAMP)
	$(PY) bench/retrieval.py
	$(PY) bench/triage.py
	$(PY) bench/serving.py
	$(PY) bench/training.py
	$(PY) bench/quantization.py
	$(PY) bench/convert_memory.py

index: $(STAMP)
	$(PY) -m knowledge build --library $${DOCTORGLM_KNOWLEDGE_PATH:-knowledge/data/sample_diseases.jsonl}

# The wheels bench/gpu_check.sh installs offline on a GPU box (bench/gpu_wheels.txt → .cache/gpu-wheels).
gpu-wheels: $(STAMP)
	PYTHON=$(PY) bash bench/gpu_check.sh --download

demo-model: $(STAMP)
	$(PY) -m training demo

clean:
	rm -rf .cache .pytest_cache
