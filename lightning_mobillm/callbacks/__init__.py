from lightning_mobillm.callbacks.monitors import DeviceMonitor, peak_rss_mb
from lightning_mobillm.callbacks.quantized_transfer import QuantizedTransfer

__all__ = ["DeviceMonitor", "QuantizedTransfer", "peak_rss_mb"]
