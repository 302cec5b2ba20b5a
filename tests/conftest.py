import os

from hypothesis import HealthCheck, settings

# CI: reproducible examples, no wall-clock deadline (the machine is shared and noisy).
settings.register_profile(
    "ci", derandomize=True, deadline=None, max_examples=60,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", deadline=None, max_examples=30)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
