"""The offline conditioning components the project trains itself, with the one trainer: the small
CLIP (``components.clip``: text encoder and CLIP-score stand-in) and the KL-VAE
(``components.vae``). Each module has ``ensure(config)`` (train when absent), ``train`` and its
export; ``ldm-scaling train-clip`` / ``train-vae`` and the study call them."""
