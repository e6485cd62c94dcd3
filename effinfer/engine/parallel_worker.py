"""Entry point of a worker rank that ``engine/executor.py`` starts on this machine (``python -m``).

Its only argument is the job (rank, world size, rendezvous address, model, engine config),
pickled and base64-encoded by the driver.
"""

from __future__ import annotations

import base64
import pickle
import sys

from effinfer.engine.executor import run_worker

if __name__ == "__main__":
    run_worker(*pickle.loads(base64.b64decode(sys.argv[1])))
