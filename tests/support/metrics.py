"""Reading this process's Prometheus series in tests."""

from prometheus_client import REGISTRY


def sample(name: str, **labels: str) -> float:
    """Current value of one series in this process (0 when it has not been touched)."""
    return REGISTRY.get_sample_value(name, labels) or 0.0
