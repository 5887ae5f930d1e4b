"""Realtime hub: WebSocket channels, fan-out across nodes, presence, history, recovery.

The protocol is docs/realtime.md. `Runtime.realtime` is a `Hub` over the broker
that `TENFOLD_EVENTS_URL` selects (in-process for memory://, NATS for nats://).
"""

from tenfold.realtime.base import Broker, Position, broker_from_url
from tenfold.realtime.hub import Hub, HubLimits, default_authorize

__all__ = ["Broker", "Hub", "HubLimits", "Position", "broker_from_url", "default_authorize"]
