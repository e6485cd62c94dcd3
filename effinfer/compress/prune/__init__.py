"""Pruning: zero (or remove) weights of a model's decoder Linears and write the smaller model.

``effinfer prune`` (``pipeline.py``) drives the methods: magnitude, Wanda and SparseGPT (unstructured
or N:M sparsity, ``masks.py`` picks which weights go) and structured pruning (``structured.py``).
"""
