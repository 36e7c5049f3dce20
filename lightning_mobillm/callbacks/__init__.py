from lightning_mobillm.callbacks.activation_cache import ActivationCache
from lightning_mobillm.callbacks.generation import GenerationEval
from lightning_mobillm.callbacks.monitors import DeviceMonitor, peak_rss_mb
from lightning_mobillm.callbacks.quantized_transfer import QuantizedTransfer

__all__ = ["ActivationCache", "DeviceMonitor", "GenerationEval", "QuantizedTransfer", "peak_rss_mb"]
