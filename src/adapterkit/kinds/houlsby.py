"""Houlsby et al. 2019 (arXiv 1902.00751): a serial bottleneck after the attention output projection
and after the FFN, each fed by that sublayer's output; the layer norms' affines train too."""

from .bottleneck import Bottleneck
from .interface import AdapterKind

KIND = AdapterKind(
    name="houlsby",
    sites={"attn": "output", "ffn": "output"},
    module=Bottleneck,
    trains_layer_norms=True,
    summary="serial after attention and FFN, trains layer norms",
    order=0,
)
