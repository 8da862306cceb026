# Two commands set up and check everything: `make install`, then `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install test test-mpi lint format bench bench-quick clean

install:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test,mpich]"
	$(BIN)/python -c "from mpi4py import MPI; print(MPI.Get_library_version().splitlines()[0])"

# The unit and end-to-end suite (the end-to-end tests start mpiexec themselves),
# then the in-process MPI tests under mpiexec with pytest-mpi.  -rs lists why tests were
# skipped (no CUDA device, no SciPy, ...), one line per reason and place with its count.
test:
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -q -rs -m "not mpi"
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/mpiexec -n 3 $(BIN)/python -m pytest -q -rs -p no:cacheprovider --with-mpi -m mpi tests/test_mpi_transport.py

lint:
	$(BIN)/ruff check mpi_imgproc tests benchmarks
	$(BIN)/ruff format --check mpi_imgproc tests benchmarks

format:
	$(BIN)/ruff format mpi_imgproc tests benchmarks
	$(BIN)/ruff check --fix mpi_imgproc tests benchmarks

bench:
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python benchmarks/bench_engines.py

# The whole measurement flow in under a minute: CSV, JSON, plots and report in bench-out/quick.
bench-quick:
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/mpi-imgproc bench --quick --out bench-out/quick

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
