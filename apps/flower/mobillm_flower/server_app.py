"""The ServerApp: the shared-model policy of ``serve --role fed``, training on each upload as it arrives."""

from lightning_mobillm.flower.apps import server_app as app

__all__ = ["app"]
