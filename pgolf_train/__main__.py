"""``python -m pgolf_train`` / ``torchrun --nproc_per_node=N -m pgolf_train --config NAME ...``."""
import sys

from pgolf_train.trainer import main

sys.exit(main())
