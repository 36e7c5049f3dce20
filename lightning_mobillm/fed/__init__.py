"""Fed MobiLLM's core, with no transport in it (issue 10; ``../shared/METHODS.md`` section 3).

* :mod:`~lightning_mobillm.fed.alignment`: layer alignment (K near-equal blocks of each backbone, the last
  layer of each tapped) and width alignment (one trainable projection per backbone type to the shared width).
* :mod:`~lightning_mobillm.fed.partition`: IID, Dirichlet(alpha) over labels and by-size partitions of a data
  set across devices (flwr-datasets' partitioners when installed, a built-in Dirichlet otherwise).
* :mod:`~lightning_mobillm.fed.clock`: a deterministic virtual clock (device profiles, an event queue, no real
  sleeping) that turns measured compute and counted bytes into simulated time.
* :mod:`~lightning_mobillm.fed.upload`: the :class:`~lightning_mobillm.fed.upload.Upload` a device hands the
  server once (no field for labels, token ids or text).
* :mod:`~lightning_mobillm.fed.device`: the device worker: forwards its shard once, aligned loss-token taps,
  device-defined targets, quantised uploads; evaluates locally with the parts it downloads.
* :mod:`~lightning_mobillm.fed.model`: the shared side network (per-type projections, a shared trunk, target
  heads per device or shared).
* :mod:`~lightning_mobillm.fed.trainer`: the shared-model trainer a server policy wraps (accept and cache
  uploads, train on arrival, replay, statistics, checkpoints) and its asynchronous simulation on the clock.

Nothing here imports the server runtime, Lightning's Trainer or a transport: the device worker, the shared-model
server policy, our gRPC link and the Flower app build on these pieces.
"""
