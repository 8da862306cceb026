# Two commands set up and check everything: `make install`, then `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install test test-hpc test-mpi lint format bench bench-quick clean

install:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test,mpich]"
	$(BIN)/python -c "from mpi4py import MPI; print(MPI.Get_library_version().splitlines()[0])"

# The unit and end-to-end suite (the end-to-end tests start mpiexec themselves),
# then the in-process MPI tests under mpiexec with pytest-mpi.  -rs lists why tests were
# skipped (no CUDA device, no SciPy, ...), one line per reason and place with its count.
test:
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -q -rs -m "not mpi" --ignore=tests/hpc
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/mpiexec -n 3 $(BIN)/python -m pytest -q -rs -p no:cacheprovider --with-mpi -m mpi tests/test_mpi_transport.py

# The HPC lane (tests/hpc): simulated nodes in network namespaces, a real one-host Slurm and
# Debian's Open MPI with mpi4py built against it.  Needs root; the packages are installed once
# with apt-get when missing, and every test skips with its reason where that is not possible.
HPC_PACKAGES := iproute2 slurmctld slurmd slurm-client munge openmpi-bin libopenmpi-dev gcc libpython3-dev
test-hpc:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  missing=$$(for p in $(HPC_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	  if [ -n "$$missing" ]; then \
	    echo "test-hpc: installing $$missing"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null) \
	      || echo "test-hpc: apt-get failed; tests that need these packages will skip"; \
	  fi; \
	fi
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -q -rs tests/hpc

lint:
	$(BIN)/ruff check mpi_imgproc tests benchmarks
	$(BIN)/ruff format --check mpi_imgproc tests benchmarks

format:
	$(BIN)/ruff format mpi_imgproc tests benchmarks
	$(BIN)/ruff check --fix mpi_imgproc tests benchmarks

bench:
	PATH="$(CURDIR)/$(BIN):$$PATH" sh benchmarks/compare.sh bench-out/compare

# The whole measurement flow in under a minute: CSV, JSON, plots and report in bench-out/quick.
bench-quick:
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/mpi-imgproc bench --quick --out bench-out/quick

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
