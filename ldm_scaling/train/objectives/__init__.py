"""Training objectives, chosen by ``config.objective.name``; the contract is in ``base``.

* ``denoising``: the text-conditional UNet's pretraining (one network, one phase);
* ``consistency``: consistency distillation of a trained UNet (student + frozen teacher);
* ``scale_wise``: scale-wise distillation (SwD: student + fake-score network + GAN head, a frozen
  teacher);
* ``vae``: the project's KL autoencoder (``ldm-scaling train-vae``);
* ``clip``: the small offline CLIP, contrastive (``ldm-scaling train-clip``).

Adding an objective = one module + one ``@base.register(name)`` + its import below.
"""

from ldm_scaling.train.objectives import autoencoder
from ldm_scaling.train.objectives import consistency
from ldm_scaling.train.objectives import contrastive
from ldm_scaling.train.objectives import denoising
from ldm_scaling.train.objectives import scalewise
from ldm_scaling.train.objectives.base import (OBJECTIVES, Frozen, Network, Objective, Phase,
                                               build, check_declaration, phase_at, register,
                                               updates_before, validate)

__all__ = ["OBJECTIVES", "Frozen", "Network", "Objective", "Phase", "autoencoder", "build",
           "check_declaration", "consistency", "contrastive", "denoising", "phase_at", "register",
           "scalewise", "updates_before", "validate"]
