# Two commands do all the set-up on a fresh machine:
#   make demo   create .venv, install, train STF for 3500 steps on the embedded digits' training split (evaluation
#               holds out the other 1000), write samples + model card; a rerun continues a killed run, and once it
#               has finished says where the results are and changes nothing
#   make test   create .venv, install, run the test suite (< 10 min)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The demo trains with one CPU thread whose OpenMP runtime sleeps rather than spins while it waits: next to other
# busy processes, two spinning threads ran more than 10x slower than one, while on a quiet machine two are at most
# 1.2-1.4x faster (benchmarks/bench_threads.py, docs/results.md). `make demo DEMO_THREADS=2` on a machine of your own.
DEMO_THREADS ?= 1

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# the local CPU wheel: a bare `torch` requirement would pull a multi-GB CUDA build
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"
	touch $@

install: $(BIN)/.installed

demo: $(BIN)/.installed
	OMP_WAIT_POLICY=PASSIVE $(BIN)/accelerate launch --cpu --num_processes 1 --num_machines 1 \
		--num_cpu_threads_per_process $(DEMO_THREADS) --mixed_precision no --dynamo_backend no \
		examples/train_stf.py --output_dir outputs/stf-digits --resume_from_checkpoint latest --max_train_steps 3500

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q

.PHONY: install demo test
