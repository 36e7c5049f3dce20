"""LightningModules: the side networks with their losses and optimisers."""

from lightning_mobillm.modules.additive import AdditiveAdapterModule
from lightning_mobillm.modules.causal_lm import CausalLMSideModule
from lightning_mobillm.modules.fed_device import FedDeviceModule as FedDeviceModule  # Fed MobiLLM's device
from lightning_mobillm.modules.side_tuning import SideTuningModule

__all__ = ["AdditiveAdapterModule", "CausalLMSideModule", "SideTuningModule"]
