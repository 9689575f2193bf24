"""The Jupyter server extension: ``/api/v2`` REST and WebSocket over a bridge to the host kernel.

``app`` (the ``ExtensionApp``), ``host`` (which kernel is the host, its settings, event fan-out),
``connection`` (the channels, subshell and comm to one kernel), ``handlers`` (REST), ``websocket``
(events), ``openapi`` (the API description). Light: the server
process imports this package, so nothing here imports torch, transformers or peft.
"""
