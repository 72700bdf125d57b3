"""The embedded engine: an OpenAI-compatible server over transformers + torch.

``llm-exporter serve`` with no ``--upstream`` starts it as a subprocess (:mod:`.launch`) so a
newcomer sees real figures from a real model (Gemma 3 270M by default, :mod:`.gemma`). Modules:
:mod:`.model` loads, :mod:`.scheduler` queues and batches and times the phases, :mod:`.server`
speaks HTTP, :mod:`.tiny` builds the tests' tiny model.
"""
