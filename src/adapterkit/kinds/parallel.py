"""He et al. 2022 (arXiv 2110.04366): a bottleneck beside the FFN, fed by the FFN block's input
(captured by a pre-hook), scaled (x4 by default) and added to the FFN's output."""

from .bottleneck import Bottleneck
from .interface import AdapterKind

KIND = AdapterKind(
    name="parallel",
    sites={"ffn": "input"},
    module=Bottleneck,
    default_scaling=4.0,
    summary="beside the FFN: fed by its input, scaled x4, added to its output",
    order=2,
)
