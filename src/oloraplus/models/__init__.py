"""Models: the registry of named models, loading (hub ids, folders, GGUF files) and per-family facts.

A new model family is one entry in ``models/families.py``.
"""
