"""Fuzzing as tests: mutated copies of a valid file never make the validator raise."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exl2.conformance.fuzz import MUTATIONS, mutate, seed_file
from exl2.conformance.validate import validate_path


@pytest.fixture(scope="module")
def seed_bytes(tmp_path_factory) -> bytes:
    p = tmp_path_factory.mktemp("fuzz") / "seed.safetensors"
    seed_file(p)
    assert validate_path(p, deep=True).ok
    return p.read_bytes()


@settings(max_examples=60)
@given(kind=st.sampled_from(MUTATIONS), seed=st.integers(0, 2**32))
def test_mutations_never_crash_the_validator(seed_bytes, tmp_path_factory, kind, seed):
    target = Path(tmp_path_factory.mktemp("case")) / "case.safetensors"
    data = mutate(seed_bytes, random.Random(seed), kind)
    target.write_bytes(data)
    report = validate_path(target, deep=True)
    if data != seed_bytes and kind in ("truncate", "extend", "offsets"):
        assert not report.ok  # these always break the container
    for f in report.findings:
        assert f.code and f.message and f.file


@settings(max_examples=40)
@given(data=st.binary(max_size=300))
def test_arbitrary_bytes_never_crash(tmp_path_factory, data):
    target = Path(tmp_path_factory.mktemp("bytes")) / "x.safetensors"
    target.write_bytes(data)
    report = validate_path(target)
    assert not report.ok or report.summary.layers == 0  # random bytes hold no valid layer
