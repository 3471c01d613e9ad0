"""turso-server's tests (trial)."""

from hypothesis import HealthCheck, settings

# The suite runs two at a time beside real daemons: a property test may not
# fail on how fast its machine is (generation speed or a per-example deadline).
settings.register_profile("suite", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("suite")
