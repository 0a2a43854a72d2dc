"""The fault tests' generated-input budget: ``PACKETFLOW_FAULTS_PROFILE=ci`` (the default,
seconds per test) or ``long`` (thousands of examples each)."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

_SETTINGS = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow,
                                                         HealthCheck.function_scoped_fixture]}
settings.register_profile("ci", max_examples=40, **_SETTINGS)
settings.register_profile("long", max_examples=2000, **_SETTINGS)
settings.load_profile(os.environ.get("PACKETFLOW_FAULTS_PROFILE", "ci"))
