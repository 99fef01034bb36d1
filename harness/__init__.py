"""Real-call harness for chan_websocket playback marks.

A real Asterisk (:mod:`harness.asterisk`), a WebSocket bot that Asterisk dials
(:mod:`harness.bot`), a real SIP caller (:mod:`harness.caller`), RTP capture on
loopback (:mod:`harness.capture`) and the analysis that ties them together
(:mod:`harness.analysis`).
"""

__version__ = "0.1.0"
