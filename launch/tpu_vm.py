r"""Launch a sweep (or one experiment config) on every worker of a Cloud TPU VM slice.

  python launch/tpu_vm.py --config configs/sweeps/model_size.py --tpu-name ldm-v4 \
      --zone us-central2-b --accelerator-type v4-32 --bucket gs://BUCKET --dry-run
  python launch/tpu_vm.py --config configs/t2i.py:width=768 --workdir gs://BUCKET/runs/w768 \
      --tpu-name ldm-v5p --zone us-east5-a --accelerator-type v5p-32 --queued --spot
  python launch/tpu_vm.py --teardown --tpu-name ldm-v4 --zone us-central2-b \
      --accelerator-type v4-32

The same as `ldm-scaling sweep --launcher tpu`; the logic is ldm_scaling.launch.tpu (see
docs/launch.md). --dry-run prints the whole gcloud sequence and needs no gcloud.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ldm_scaling.cli import launch  # pylint: disable=wrong-import-position

if __name__ == "__main__":
  sys.exit(launch.main(sys.argv[1:], launcher="tpu", prog="launch/tpu_vm.py"))
