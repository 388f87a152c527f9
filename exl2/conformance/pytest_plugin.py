"""pytest plugin: run the EXL2 conformance suite against your own kernel in your own CI.

Installed with the ``exl2`` package (entry point ``exl2_conformance``), so it is active in any
pytest run. In your test file:

    from exl2.conformance.pytest_plugin import conformance_test

    test_exl2 = conformance_test("mypackage.kernels:dequantize")   # or a module with dequantize/matmul

or leave the backend out and choose it on the command line: ``pytest --exl2-backend mypackage.kernels``.
The test exports the vectors once per session, checks every positive vector bit for bit (and the
matmul within the spec's bound when the backend has ``matmul``), runs hypothesis-generated layers
against the reference, and fails with the list of failing features.

This module imports only pytest at import time, so it costs nothing in runs that do not use it.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("exl2", "EXL2 conformance")
    group.addoption("--exl2-backend", default=None, metavar="MODULE[:FUNCTION]",
                    help="implementation checked by conformance_test() (default: the one it names, else reference)")
    group.addoption("--exl2-examples", type=int, default=25, help="hypothesis-generated layers per run")


@pytest.fixture(scope="session")
def exl2_vectors(tmp_path_factory: pytest.TempPathFactory):
    """Path of the exported conformance vectors (exported once per session)."""
    from .vectors import export

    directory = tmp_path_factory.mktemp("exl2-vectors") / "vectors"
    export(directory)
    return directory


def conformance_test(backend: str | None = None, examples: int | None = None) -> Callable[..., None]:
    """A test function checking ``backend`` (``MODULE`` or ``MODULE:FUNCTION``) against the suite."""

    def test_exl2_conformance(exl2_vectors, request: pytest.FixtureRequest) -> None:
        from .harness import load_backend, run

        spec = request.config.getoption("--exl2-backend") or backend or "reference"
        n = examples if examples is not None else request.config.getoption("--exl2-examples")
        results = run(load_backend(spec), exl2_vectors, n)
        failed = {name: r.failures[:3] for name, r in sorted(results.items()) if r.failed}
        assert not failed, f"{spec} fails EXL2 conformance features: {failed}"

    return test_exl2_conformance
