"""Shared test set-up.

- Without a GPU, the test process opts in to Triton's interpreter (:func:`exl2.fast.use_interpreter`,
  before anything imports triton), so the fast path's tests run on the CPU. exl2 itself never
  does this; subprocesses started by tests inherit it.
- Hypothesis profiles, chosen with ``HYPOTHESIS_PROFILE`` (README, "Tests"):

  - ``ci`` (the default): derandomized, so every run and every machine tries the same examples
    and a red run always points at the change under test (rerunning cannot turn it green);
    no example database. Fast enough for every push.
  - ``fresh``: a new random seed per run, :data:`FRESH_FACTOR` times the examples of every
    property test (those that set ``max_examples`` too), and the example database in
    ``.hypothesis/``, so a failure found once is replayed first on the next run. For manual and
    scheduled runs: ``HYPOTHESIS_PROFILE=fresh pytest``. A failure prints the
    ``@reproduce_failure`` blob; ``pytest --hypothesis-seed=N`` reruns a seed.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    from exl2.fast import use_interpreter

    use_interpreter()

from hypothesis import HealthCheck, settings  # noqa: E402
from hypothesis.database import DirectoryBasedExampleDatabase  # noqa: E402

#: The suite uses the conformance plugin's fixtures (exl2_vectors) as any project would: by opting in.
pytest_plugins = ["exl2.conformance.pytest_plugin"]

#: How many times more examples each property test tries under the ``fresh`` profile.
FRESH_FACTOR = 4

_SLOW_IS_FINE = [HealthCheck.too_slow, HealthCheck.data_too_large]
settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True, database=None,
                          suppress_health_check=_SLOW_IS_FINE)
settings.register_profile("fresh", max_examples=25 * FRESH_FACTOR, deadline=None, derandomize=False,
                          database=DirectoryBasedExampleDatabase(".hypothesis/examples"), print_blob=True,
                          suppress_health_check=_SLOW_IS_FINE)
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
settings.load_profile(PROFILE)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under ``fresh``, scale the examples of tests that fix their own ``max_examples`` (kept
    small for CI because the fast path's tests run interpreted) by :data:`FRESH_FACTOR`.
    Hypothesis keeps a test's ``@settings`` on the function; a new settings object derived from
    it replaces it."""
    if PROFILE != "fresh":
        return
    scaled = set()
    for item in items:
        test = getattr(item, "obj", None)
        if not getattr(test, "_hypothesis_internal_settings_applied", False) or id(test) in scaled:
            continue  # no @settings of its own (the profile applies), or seen (a parametrized test)
        scaled.add(id(test))
        own = test._hypothesis_internal_use_settings
        test._hypothesis_internal_use_settings = settings(own, max_examples=own.max_examples * FRESH_FACTOR)
