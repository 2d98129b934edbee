"""Networks: the factory that builds a plan's network, pointwise heads, and loading their weights."""

from medseg.networks.cascade import PreviousStageInput
from medseg.networks.factory import build_network
from medseg.networks.heads import split_pointwise_head
from medseg.networks.weights import (
    load_weights,
    read_state_dict,
    torch_load_weights_only,
)

__all__ = ["PreviousStageInput", "build_network", "load_weights", "read_state_dict", "split_pointwise_head",
           "torch_load_weights_only"]
