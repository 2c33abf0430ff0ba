"""`python -m at_jax.convert CHECKPOINT OUT_DIR`: converts a checkpoint file into a params export."""

import sys

from at_jax.convert import load

sys.exit(load.main())
