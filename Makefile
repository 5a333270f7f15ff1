# Two commands on a fresh machine: `make run` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# Reinstall whenever pyproject.toml or the protos change.
STAMP := $(VENV)/.installed

.PHONY: run test bench proto clean system-deps

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml protos/trace.proto
	$(BIN)/pip install --quiet -e '.[build,test]'
	$(MAKE) proto
	touch $(STAMP)

proto: $(BIN)/python
	$(BIN)/python -m grpc_tools.protoc -Iext_proc/pb=protos \
		--python_out=. --grpc_python_out=. --pyi_out=. ext_proc/pb/trace.proto

# Debian packages the test suite and the benchmark start for real: a Redis server
# for the shared session store, and wrk as the load generator.
system-deps:
	@command -v redis-server >/dev/null && command -v wrk >/dev/null || { \
		apt-get update -qq && apt-get install -y -qq redis-server wrk >/dev/null; }

run: $(STAMP)
	$(BIN)/python -m ext_proc.demo

test: $(STAMP) system-deps
	env -u RUST_BACKTRACE $(BIN)/python -m pytest

bench: $(STAMP) system-deps
	env -u RUST_BACKTRACE $(BIN)/python -m bench.run

clean:
	rm -rf $(VENV) ext_proc/pb/*_pb2*.py ext_proc/pb/*_pb2.pyi
