"""The engine: the torch side of gpugroups, run in the kernel (the Jupyter server never imports it).

``manager`` (the public facade) sits on ``residency`` (slots, placement carried out), ``worker``
(one per device: loads, unloads, batched forward passes), ``state``, ``bus`` and ``estimates``;
``runtime``, ``inference`` and ``torchkit`` are what a worker runs, ``estimate`` and ``devices`` what
it measures. This package's own import is light; torch comes with ``runtime`` and ``inference``.
"""
