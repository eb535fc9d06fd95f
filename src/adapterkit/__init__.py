"""adapterkit: bottleneck adapters on unmodified Hugging Face transformers.

    model = AdapterModel(AutoModel.from_pretrained(path))
    model.add_adapter("sentiment", AdapterConfig("houlsby"), head="classification", labels=["neg", "pos"])
    model.train_adapter("sentiment")
    out = model(**batch, adapter_names=["sentiment", "topic", None])  # one adapter per row
"""

__version__ = "0.1.0"

from .artifact import ArtifactError, BaseModelMismatch, read_metadata  # noqa: E402
from .composition import Average, Fuse, Parallel, Stack  # noqa: E402
from .config import AdapterConfig  # noqa: E402
from .model import AdapterModel, AdapterOutput, ParameterReport  # noqa: E402
from .sites import SITES, SiteSpec, UnknownArchitecture, sites_for  # noqa: E402

__all__ = [
    "AdapterConfig",
    "AdapterModel",
    "AdapterOutput",
    "ArtifactError",
    "Average",
    "BaseModelMismatch",
    "Fuse",
    "Parallel",
    "ParameterReport",
    "SITES",
    "SiteSpec",
    "Stack",
    "UnknownArchitecture",
    "read_metadata",
    "sites_for",
]
