"""Defaults the server and its command line share (kept apart from app.py, which needs FastAPI)."""

DEFAULT_MAX_BODY_BYTES = 16 << 20
# Sequences that may wait beyond the engine's running batch before new requests get 503.
DEFAULT_MAX_QUEUE = 256
