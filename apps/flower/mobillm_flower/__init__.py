"""The Fed MobiLLM Flower app: thin entry points over :mod:`lightning_mobillm.flower` (see README.md here)."""
