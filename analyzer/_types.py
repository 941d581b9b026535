"""Names shared by the detectors, the presentation model and every renderer."""

from __future__ import annotations

SEVERITIES = ("error", "warning", "info")
"""The one severity order, most urgent first: findings, their groups and the charts' notes sort by it."""

SEVERITY_RANK = {s: i for i, s in enumerate(SEVERITIES)}
"""severity -> its place in :data:`SEVERITIES`; an unknown severity ranks after all of them."""

OUTCOMES = ("2xx", "3xx", "4xx", "5xx", "error")
"""How a hop ended, by class: ``error`` when it failed (even with a status) or had no response."""
