"""Reading one sample out of a Prometheus text exposition (``/metrics``)."""

from __future__ import annotations


def sample(text: str, series: str) -> float:
    """The value of ``series`` exactly as exposed (``name`` or ``name{label="v"}``);
    0 when the series is absent (a counter nothing has counted yet)."""
    prefix = series + " "
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix):].split()[0])
    return 0.0
