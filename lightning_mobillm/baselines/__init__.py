"""On-device baselines a user would otherwise pick, trained and measured like the MobiLLM runs.

* :class:`FullFineTuneClassifier` -- on-device full fine-tuning;
* :class:`LoRAClassifier` -- on-device LoRA (the PEFT library);
* :class:`LadderSideTuningClassifier` -- on-device Ladder Side-Tuning;
* :class:`MeZOClassifier` -- zeroth-order fine-tuning (MeZO) with forward passes only, at the memory of
  inference and with no server;
* :class:`SplitLearningClassifier` -- split learning over the framework's gRPC link (the device keeps the
  first blocks with LoRA, a server the rest; activations up, gradients down);
* :class:`OnDeviceCausalLM` -- the generative baselines: zero-shot, LoRA and full fine-tuning of the causal LM.
"""

from lightning_mobillm.baselines.causal_lm import OnDeviceCausalLM
from lightning_mobillm.baselines.common import OnDeviceClassifier
from lightning_mobillm.baselines.finetune import FullFineTuneClassifier, LoRAClassifier
from lightning_mobillm.baselines.lst import LadderSideNetwork, LadderSideTuningClassifier
from lightning_mobillm.baselines.mezo import MeZO, MeZOClassifier
from lightning_mobillm.baselines.split import SplitLearningClassifier

__all__ = [
    "FullFineTuneClassifier",
    "LadderSideNetwork",
    "LadderSideTuningClassifier",
    "LoRAClassifier",
    "MeZO",
    "MeZOClassifier",
    "OnDeviceCausalLM",
    "OnDeviceClassifier",
    "SplitLearningClassifier",
]
