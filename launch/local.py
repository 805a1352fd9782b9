"""Launch a sweep (or one experiment config) as processes on this machine.

  python launch/local.py --config "configs/sweeps/model_size.py:widths=(64,128)" --dry-run
  python launch/local.py --config "configs/sweeps/model_size.py:widths=(64,128)" --parallel 2
  python launch/local.py --config configs/cpu_t2i.py:width=32 --workdir runs/cpu_w32

The same as `ldm-scaling sweep --launcher local`; the logic is ldm_scaling.launch (docs/launch.md).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ldm_scaling.cli import launch  # pylint: disable=wrong-import-position

if __name__ == "__main__":
  sys.exit(launch.main(sys.argv[1:], launcher="local", prog="launch/local.py"))
