"""Compressed-weight types and their arithmetic: the floor under ``kernels/``.

Every way effinfer stores a weight other than a plain float tensor (integer codes with group
scales, fp8, NF4 / FP4 codebooks, LLM.int8()) is a ``CompressedWeight`` (``base.py``): one
reference matmul that every kernel is tested against, a device move, row split / join for
fused and sharded layers, and save / load as a flat tensor dict. ``registry.py`` names the
schemes (what ``--quantization`` offers) and the kernels registered for each weight type.
This package imports only torch and the standard library; see docs/quantization-schemes.md.
"""
