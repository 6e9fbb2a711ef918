"""The pinned trajectory: code moves must not change what daytune computes (values recorded by tests/pinned.py).

On the CPU kernel the pins were recorded with, every value must be identical (losses, adapter checksum, eval
records, server tokens and logprobs). On another kernel, floating-point sums may round differently: there the
values must agree within 1e-4 and the checksum is not compared (the reason is printed)."""

from __future__ import annotations

import json
import math

import pytest
from pinned import FIXTURE, cpu_kernel, observe


@pytest.fixture(scope="module")
def observed(tmp_path_factory, tiny_model_dir):
    return observe(tmp_path_factory.mktemp("pinned"), tiny_model_dir)


@pytest.fixture(scope="module")
def pinned():
    return json.loads(FIXTURE.read_text())


def _same(a, b, exact: bool, where: str = "") -> None:
    if isinstance(a, float) or isinstance(b, float):
        assert isinstance(a, int | float) and isinstance(b, int | float), f"{where}: {a!r} vs {b!r}"
        if exact:
            assert a == b or (math.isnan(a) and math.isnan(b)), f"{where}: {a!r} != pinned {b!r}"
        else:
            assert math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-4), f"{where}: {a!r} vs pinned {b!r}"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and sorted(a) == sorted(b), f"{where}: keys {sorted(a)} vs {sorted(b)}"
        for k in a:
            _same(a[k], b[k], exact, f"{where}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), f"{where}: length {len(a)} vs {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, exact, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != pinned {b!r}"


def _exact(pinned) -> bool:
    return pinned["kernel"] == cpu_kernel()


def test_training_trajectory_is_pinned(observed, pinned):
    assert len(observed["train"]["losses"]) == 10
    _same(observed["train"]["losses"], pinned["train"]["losses"], _exact(pinned), "losses")
    if _exact(pinned):
        assert observed["train"]["adapter_sha256"] == pinned["train"]["adapter_sha256"]
    else:
        print(f"pins recorded on {pinned['kernel']}, this is {cpu_kernel()}: checksum not compared")


def test_eval_outputs_are_pinned(observed, pinned):
    _same(observed["eval"], pinned["eval"], _exact(pinned), "eval")


def test_server_outputs_are_pinned(observed, pinned):
    _same(observed["serve"], pinned["serve"], _exact(pinned), "serve")
