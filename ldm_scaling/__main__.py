import sys

from ldm_scaling.cli import main

sys.exit(main())
