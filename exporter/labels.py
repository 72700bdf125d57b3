"""Bounded label values. Model names come from requests (free text), so only the first
``max_models`` names that the upstream accepted (a 2xx answer) become label values; every
other name is ``other``. Nothing per-request ever becomes a label."""

from __future__ import annotations

OTHER = "other"
UNKNOWN = "unknown"
_MAX_LEN = 128

METHODS = frozenset({"GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"})
FINISH_REASONS = frozenset({"stop", "length", "tool_calls", "content_filter", "function_call",
                            "cancelled", "error", "abort"})


class ModelLabels:
    def __init__(self, max_models: int) -> None:
        self.max_models = max_models
        self._known: set[str] = set()

    def label(self, model: object, *, accepted: bool) -> str:
        """The label for ``model``; ``accepted`` (upstream answered 2xx) may admit a new one."""
        if not isinstance(model, str) or not model:
            return UNKNOWN
        if model in self._known:
            return model
        if accepted and len(self._known) < self.max_models and len(model) <= _MAX_LEN \
                and model.isprintable():
            self._known.add(model)
            return model
        return OTHER


def status_class(status: int | None) -> str:
    return f"{status // 100}xx" if status else "none"


def method(value: str) -> str:
    return value if value in METHODS else OTHER


def finish_reason(value: str | None) -> str:
    if value is None:
        return "unknown"
    return value if value in FINISH_REASONS else OTHER
