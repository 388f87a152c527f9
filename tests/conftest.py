"""Shared test set-up.

- Without a GPU, Triton kernels run under Triton's interpreter: TRITON_INTERPRET must be set
  before triton is first imported, so it is set here, at collection time.
- Hypothesis profiles: ``ci`` (default) keeps the suite within a few minutes on 2 cores;
  ``thorough`` (HYPOTHESIS_PROFILE=thorough) runs many more examples.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("thorough", max_examples=500, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
