"""Serving many adapters on one base model over HTTP, with cross-task batching.

    adapterkit serve --base ./minilm --registry ./adapters --port 8000

or in Python::

    from adapterkit.serve import ServeConfig, create_app
    app = create_app(ServeConfig(base="./minilm", registry="./adapters"))   # any ASGI server

``batcher.py`` gathers requests into batches, ``cache.py`` loads and evicts adapters, ``runner.py``
runs one mixed-task forward pass per batch, ``app.py`` is the HTTP API.
"""

from .app import ServeConfig, create_app
from .batcher import Batcher, QueueFull
from .cache import AdapterCache, FolderSource, RegistrySource, UnknownAdapter, open_source

__all__ = [
    "AdapterCache",
    "Batcher",
    "FolderSource",
    "QueueFull",
    "RegistrySource",
    "ServeConfig",
    "UnknownAdapter",
    "create_app",
    "open_source",
]
