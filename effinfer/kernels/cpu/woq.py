"""Placeholder CPU weight-only kernels: returns None so layers run dequantized (being replaced)."""

from __future__ import annotations


def prepare(weight, bias, dtype):
    return None


def apply(data, x):
    raise NotImplementedError
