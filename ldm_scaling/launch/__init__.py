"""Turning a config or a sweep into processes: locally, or on every worker of a TPU VM slice.

* :mod:`~ldm_scaling.launch.sweeps`: a sweep config (``configs/sweeps/*.py``) -> a list of
  :class:`~ldm_scaling.launch.sweeps.Run`, each an ``ldm-scaling train|eval`` command line;
* :mod:`~ldm_scaling.launch.local`: runs them as subprocesses here (sequential or N at a time);
* :mod:`~ldm_scaling.launch.tpu`: the ``gcloud`` command sequence that creates a slice, installs
  the package on every worker and starts the runs there, and the one that tears it down;
* :mod:`~ldm_scaling.launch.topology`: TPU slice presets and the default mesh for a model size;
* ``ldm_scaling.cli.launch``: ``ldm-scaling sweep`` and the ``launch/*.py`` scripts.

Every command is built as an argument list by a pure function (so golden tests can pin it) and
printed with ``shlex.join``; nothing here imports JAX until a config is validated.
"""
