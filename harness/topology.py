"""How a call reaches the bot: the topologies voice-bot apps really use.

Each :class:`Topology` says who creates the bot's WebSocket channel (the
dialplan's ``Dial`` or an ARI app's ``externalMedia``), which side opens the
WebSocket (Asterisk connecting out to the bot, or the bot connecting in to
Asterisk's ``/media/<connection_id>``), and the bridge the channel lands in
(two parties, or a mixing bridge: softmix forced, or a third party present).

In a two-party bridge the frame chan_websocket hands to the core leaves as
RTP at once, so MARK_PLAYED is as exact as the hand-over. In a softmix bridge
the mixer takes the frame at its next mixing tick: the audio leaves up to one
mixing interval (20 ms by default) after the hand-over, at a phase that
differs per call, and up to four intervals after it when the mixer's thread
falls behind. Positions (bytes, ms) are exact in every topology.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from harness.ari import MediaPlan


class Creation(enum.Enum):
    """Who creates the WebSocket channel."""

    DIAL = "dial"  # the dialplan: Dial(WebSocket/...)
    ARI = "ari"  # an ARI app: POST /channels/externalMedia


class Bridging(enum.Enum):
    """The bridge the WebSocket channel is in with the caller."""

    TWO_PARTY = "two-party"  # simple_bridge: frames pass at once
    SOFTMIX = "softmix"  # an ARI bridge forced to mix (mixing,video_sfu)
    THIRD_PARTY = "third-party"  # a plain mixing bridge with a silent third party


#: The mixing interval of a softmix bridge that ARI creates (bridge_softmix's
#: default), in ms: how much later than the hand-over the audio usually leaves.
SOFTMIX_INTERVAL_MS = 20
#: How many intervals of a channel's audio softmix keeps waiting before it
#: drops them (softmix_bridge_write_voice): the most the audio can lag when
#: the mixer's thread falls behind.
SOFTMIX_QUEUED_INTERVALS = 4


@dataclass(frozen=True)
class Topology:
    """One way a call reaches the bot."""

    name: str
    creation: Creation
    #: The bot connects in to Asterisk (``WebSocket/INCOMING``, externalMedia
    #: ``connection_type=server``) instead of Asterisk connecting out.
    connects_in: bool = False
    bridging: Bridging = Bridging.TWO_PARTY
    description: str = ""

    @property
    def needs_ari(self) -> bool:
        """Whether the rig's Asterisk needs ARI on (externalMedia, or the
        UserEvent that announces an INCOMING channel's connection id)."""
        return self.creation is Creation.ARI or self.connects_in

    @property
    def mixes(self) -> bool:
        """Whether the audio goes through a mixer (softmix) on its way out."""
        return self.bridging is not Bridging.TWO_PARTY

    @property
    def mixing_interval_ms(self) -> int:
        """How much later than the hand-over the audio usually leaves (0: at once)."""
        return SOFTMIX_INTERVAL_MS if self.mixes else 0

    @property
    def max_lag_ms(self) -> int:
        """The most it can leave later: the mixer's queue of a channel's audio."""
        return SOFTMIX_QUEUED_INTERVALS * SOFTMIX_INTERVAL_MS if self.mixes else 0

    def plan(self) -> MediaPlan:
        """The ARI app's plan for a call in this topology."""
        return MediaPlan(
            connection_type="server" if self.connects_in else "client",
            bridge_type="mixing,video_sfu" if self.bridging is Bridging.SOFTMIX else "mixing",
            third_party=self.bridging is Bridging.THIRD_PARTY,
        )

    def __str__(self) -> str:
        return self.name


DIAL = Topology(
    "dial", Creation.DIAL, description="Dial(WebSocket/bot/...): Asterisk connects to the bot"
)
TOPOLOGIES: dict[str, Topology] = {
    t.name: t
    for t in (
        DIAL,
        Topology(
            "dial-in",
            Creation.DIAL,
            connects_in=True,
            description="Dial(WebSocket/INCOMING/...): the bot connects in to /media/<id>",
        ),
        Topology(
            "ari",
            Creation.ARI,
            description="ARI externalMedia (connection_type=client) in a two-party mixing bridge",
        ),
        Topology(
            "ari-in",
            Creation.ARI,
            connects_in=True,
            description="ARI externalMedia (connection_type=server): the bot connects in",
        ),
        Topology(
            "ari-softmix",
            Creation.ARI,
            bridging=Bridging.SOFTMIX,
            description="ARI externalMedia in a bridge forced to mix (mixing,video_sfu: softmix)",
        ),
        Topology(
            "ari-third-party",
            Creation.ARI,
            bridging=Bridging.THIRD_PARTY,
            description="ARI externalMedia in a mixing bridge with a silent third party (softmix)",
        ),
    )
}


def topology(name: str) -> Topology:
    """The topology called *name*; ValueError naming the known ones if none is."""
    try:
        return TOPOLOGIES[name]
    except KeyError:
        raise ValueError(f"unknown topology {name!r}: one of {', '.join(TOPOLOGIES)}") from None
