"""llm-exporter: a transparent sidecar that measures every LLM request."""

__version__ = "0.1.0"
