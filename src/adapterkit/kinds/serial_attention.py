"""A serial bottleneck after the attention output projection only, fed by its output: the sequential
adapter placed at the attention sublayer, which He et al. 2022 (arXiv 2110.04366) compare with the FFN
placement; the adapters library's ``SeqBnConfig(mh_adapter=True, output_adapter=False)``."""

from .bottleneck import Bottleneck
from .interface import AdapterKind

KIND = AdapterKind(
    name="serial_attention",
    sites={"attn": "output"},
    module=Bottleneck,
    summary="serial after attention only",
)
