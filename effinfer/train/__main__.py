"""``python -m effinfer.train`` (and ``torchrun --nproc_per_node N -m effinfer.train``)."""

import sys

from effinfer.train import main

sys.exit(main(sys.argv[1:]))
