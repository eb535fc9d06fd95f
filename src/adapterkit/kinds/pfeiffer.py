"""Pfeiffer et al. 2021 (AdapterFusion, arXiv 2005.00247): one serial bottleneck per layer, after the
FFN, fed by its output."""

from .bottleneck import Bottleneck
from .interface import AdapterKind

KIND = AdapterKind(
    name="pfeiffer",
    sites={"ffn": "output"},
    module=Bottleneck,
    summary="serial after the FFN",
    order=1,
)
