"""Fed MobiLLM on Flower (issue 12): the engine for federations that outgrow one machine.

A thin wrapper over the same core as our link (:mod:`lightning_mobillm.fed`), in two halves:

* Flower-free, importable and tested without the extra:
  :mod:`~lightning_mobillm.flower.settings` (Flower's flat run config mapped onto the recipes' keys),
  :mod:`~lightning_mobillm.flower.device` (a node's device worker: its partition, its backbone, one forward,
  the upload as plain headers and tensors; evaluation with downloaded parts) and
  :mod:`~lightning_mobillm.flower.bridge` (the server side: a node's upload turned into the ``fed_hello`` and
  ``fed_upload`` frames of ``docs/protocol.md`` and handed to :class:`~lightning_mobillm.server.fed.FedServer`,
  so that Flower's uploads pass the same schemas, bounds, quotas and allow-list as our link's, and train the
  same shared-model policy).
* With ``pip install -e '.[flower]'`` only: :mod:`~lightning_mobillm.flower.apps` (the ``ClientApp`` and the
  asynchronous ``ServerApp``) and :mod:`~lightning_mobillm.flower.fedavg` (synchronous FedAvg-LoRA on Flower's
  own ``FedAvg``, a cross-check of the benchmark harness's baseline). The Flower app folder is ``apps/flower``.

Nothing here imports ``flwr`` at package import: the core works with or without the extra.
"""
