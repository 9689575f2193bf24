"""The Jupyter server extension: ``/api/v2`` REST and WebSocket over a bridge to the host kernel.

``app`` (the ``ExtensionApp`` and its settings), ``bridge`` (the host kernel connection),
``handlers`` (REST), ``websocket`` (events), ``openapi`` (the API description). Light: the server
process imports this package, so nothing here imports torch, transformers or peft.
"""
