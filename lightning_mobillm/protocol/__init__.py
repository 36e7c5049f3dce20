"""The contract between device and server: frame kinds, their schemas, and how tensors are packed.

Both sides import this package; it imports nothing of the server runtime or of Lightning.
"""

from lightning_mobillm.protocol.messages import *  # noqa: F403
from lightning_mobillm.protocol.messages import __all__ as _messages_all
from lightning_mobillm.protocol.packing import pack_acts, pack_state, unpack_acts, unpack_state

__all__ = [*_messages_all, "pack_acts", "pack_state", "unpack_acts", "unpack_state"]
