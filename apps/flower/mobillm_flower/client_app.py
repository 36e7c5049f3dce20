"""The ClientApp: a node's Fed MobiLLM device (``train.upload``: forward once and upload; ``evaluate``)."""

from lightning_mobillm.flower.apps import client_app as app

__all__ = ["app"]
