"""pytest plugin: run the EXL2 conformance suite against your own kernel, in your own CI.

Not loaded automatically (exl2 registers no pytest entry point, so it stays out of the pytest
runs of projects that merely install exl2): a project opts in, in its conftest.py

    pytest_plugins = ["exl2.conformance.pytest_plugin"]

or on the command line with ``pytest -p exl2.conformance.pytest_plugin``. Then, in a test file:

    from exl2.conformance.pytest_plugin import conformance_test

    test_exl2_conformance = conformance_test("mypackage.kernels")   # or "mypackage.kernels:dequantize"

Needs the ``conformance`` extra (``pip install 'exl2[conformance]'``: hypothesis, pydantic).

The backend is named as for ``exl2 conformance run --backend`` (:mod:`exl2.conformance.harness`):
a module or object with ``dequantize(qm)`` and optionally ``matmul(x, qm)``, ``load(tensors,
prefix)``, ``DEVICE``; or ``MODULE:FUNCTION`` for a bare dequantize function. The test exports the
vectors once per session (or uses ``--exl2-vectors DIR``), runs every vector and
``--exl2-examples N`` hypothesis-generated layers, and fails with the list of failing features and
their first failures.

Options: ``--exl2-backend MODULE[:NAME]`` is used by ``conformance_test()`` called without a
backend (which skips when neither is given); ``--exl2-vectors DIR`` uses an exported folder;
``--exl2-examples N`` (default 25). Fixture: ``exl2_vectors``, the folder of the vectors.

This module imports nothing of exl2 at import time and registers nothing but the options and
the fixture.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("exl2", "EXL2 conformance (exl2.conformance.pytest_plugin)")
    group.addoption("--exl2-backend", default=None, metavar="MODULE[:NAME]",
                    help="implementation checked by conformance_test() when it names none")
    group.addoption("--exl2-vectors", default=None, metavar="DIR",
                    help="exported conformance vectors to use (default: export once per session)")
    group.addoption("--exl2-examples", type=int, default=25, metavar="N",
                    help="hypothesis-generated layers per conformance test (default 25)")


@pytest.fixture(scope="session")
def exl2_vectors(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder of the EXL2 conformance vectors: ``--exl2-vectors`` if given, else exported once per session."""
    given = request.config.getoption("--exl2-vectors")
    if given:
        return Path(given)
    from .vectors import export

    directory = tmp_path_factory.mktemp("exl2-vectors") / "vectors"
    export(directory)
    return directory


def conformance_test(backend: str | None = None, examples: int | None = None,
                     device: str | None = None) -> Callable[..., None]:
    """A pytest test function that checks ``backend`` (``MODULE`` or ``MODULE:NAME``, as
    ``exl2 conformance run --backend``) against the suite; assign it to a ``test_*`` name.
    ``backend`` None: the ``--exl2-backend`` option, and a skip when that is not given either.
    ``examples`` None: ``--exl2-examples``. ``device``: where layers go (default: the backend's)."""

    def test_exl2_conformance(exl2_vectors: Path, request: pytest.FixtureRequest) -> None:
        from .harness import load_backend, run

        spec = backend or request.config.getoption("--exl2-backend")
        if not spec:
            pytest.skip("no backend: pass conformance_test('MODULE[:NAME]') or --exl2-backend MODULE[:NAME]")
        n = examples if examples is not None else request.config.getoption("--exl2-examples")
        results = run(load_backend(spec, device), exl2_vectors, n)
        failed = {name: r.failures[:3] for name, r in sorted(results.items()) if r.failed}
        if failed:
            lines = [f"  {name}: {r.failed} failed, e.g. {failed[name][0]}" for name, r in sorted(results.items()) if r.failed]
            pytest.fail(f"{spec} fails EXL2 conformance in {len(failed)} feature(s):\n" + "\n".join(lines),
                        pytrace=False)

    return test_exl2_conformance


__all__ = ["conformance_test", "exl2_vectors"]
