"""Faults on the link between Asterisk and the bot: the bot in a network
namespace of its own, joined by a veth pair, its traffic delayed with jitter,
dropped at random, black-holed or reset (harness.netns).

While the bot's audio is queued in Asterisk, whatever happens on the link, the
caller's RTP keeps its 20 ms grid, every mark is answered exactly once (or,
after a reset, is reported unanswered), and Asterisk carries on.

Needs root, iproute2, iptables and fnfqueue; in CI a missing one fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness import audio
from harness.bot import BotError, BotServer, BotSession
from harness.caller import SipPhone
from harness.capture import RtpPacket
from harness.netns import NetNs, NetNsError, Shape, check_possible, remove_stale
from harness.rig import Rig
from tests.conftest import failed, need, report

#: 200 ms of μ-law per message: a WebSocket frame larger than a TCP segment.
CHUNK_FRAMES = 10
CHUNKS = 60
#: Chunks sent at once before the rest follow in real time: 8 s queued ahead,
#: more than a 3 s black hole and TCP's retransmission back-off after it.
AHEAD = 40


@pytest.fixture(scope="module")
def netns_possible() -> None:
    try:
        check_possible()
        import fnfqueue  # noqa: F401 - the delay needs it
    except (NetNsError, ImportError) as exc:
        need(False, f"network namespaces: {exc}")
    remove_stale()


@pytest.fixture
async def linked(
    request: pytest.FixtureRequest,
    netns_possible: None,
    capture_ok: None,
    install: Path,
    phone: SipPhone,
) -> AsyncIterator[tuple[NetNs, Rig]]:
    """A namespace with the bot in it, and an Asterisk here that dials it."""
    async with NetNs() as ns:
        bot = BotServer(ns.ns_ip, sock=ns.listening_socket())
        workdir = Path(tempfile.mkdtemp(prefix="linkfault-"))
        async with Rig(install, workdir, phone=phone, bot=bot) as rig:
            try:
                yield ns, rig
            finally:
                if failed(request):
                    print(rig.describe_logs())  # noqa: T201 - shown in the failure report


@dataclass
class Outcome:
    """What became of a call's marks and of its audio, as the harness saw it."""

    played: list[str]
    cleared: list[str]
    unanswered: list[str]
    largest_gap_ms: float
    frames: list[int | None]

    def describe(self) -> str:
        return (
            f"{len(self.played)} marks played, {len(self.cleared)} cleared, "
            f"{len(self.unanswered)} unanswered; largest RTP gap {self.largest_gap_ms:.1f} ms"
        )


def outcome(session: BotSession, packets: list[RtpPacket], sent: list[str]) -> Outcome:
    answers = session.named("MARK_PLAYED", "MARK_CLEARED")
    ids = [e.mark_id for e in answers]
    duplicates = [i for i in set(ids) if ids.count(i) > 1]
    assert not duplicates, f"marks answered twice: {duplicates}"
    times = sorted(p.t for p in packets)
    gap = max((b - a for a, b in itertools.pairwise(times)), default=0.0) * 1000
    return Outcome(
        played=[e.mark_id or "" for e in answers if e.name == "MARK_PLAYED"],
        cleared=[e.mark_id or "" for e in answers if e.name == "MARK_CLEARED"],
        unanswered=[m for m in sent if m not in ids],
        largest_gap_ms=gap,
        frames=[audio.frame_index(p.payload) for p in packets],
    )


async def stream(session: BotSession, fault: Callable[[], Awaitable[None]]) -> list[str]:
    """Stream the chunks, a MARK after each, while *fault* runs; the marks sent."""
    sent: list[str] = []
    task = asyncio.ensure_future(fault())
    try:
        for k in range(CHUNKS):
            await session.send_audio(audio.tagged_frames(k * CHUNK_FRAMES, CHUNK_FRAMES))
            await session.command("MARK", f"m{k}")
            sent.append(f"m{k}")
            if k >= AHEAD:
                await asyncio.sleep(CHUNK_FRAMES * 0.02)
    except Exception:
        if not session.closed.is_set():
            raise
    finally:
        await task
    return sent


async def nothing() -> None:
    return None


SHAPES = {
    "delay 80 ms, jitter 40 ms": Shape.delay(80, 40),
    "loss 5 %": Shape.loss(5),
    "delay 40 ms, jitter 20 ms, loss 5 %": Shape.delay(40, 20, loss_percent=5),
}


@pytest.mark.beyond_the_feature  # patch 11: no wait for the rest of a frame
@pytest.mark.parametrize("name", list(SHAPES))
async def test_a_bad_link_neither_stalls_the_caller_nor_loses_a_mark(
    linked: tuple[NetNs, Rig], name: str
) -> None:
    ns, rig = linked
    async with rig.call() as call:
        # Once the call is up: the fault is on the media path, not on the way
        # Asterisk connects (res_websocket_client gives up on a lost SYN).
        await ns.shape(SHAPES[name], SHAPES[name])
        sent = await stream(call.session, nothing)
        await call.session.wait_mark(sent[-1], timeout=CHUNKS * 0.2 + 10)
    result = outcome(call.session, call.packets, sent)
    report(f"link: {name}", result.describe())
    assert result.played == sent, "every mark played, in order"
    for k, event in enumerate(call.session.named("MARK_PLAYED")):
        assert event.get_int("played_ms") == (k + 1) * CHUNK_FRAMES * 20
    assert result.frames == list(range(CHUNKS * CHUNK_FRAMES)), "every frame once, in order"
    assert result.largest_gap_ms < 50, "the caller's audio kept its 20 ms grid"


@pytest.mark.beyond_the_feature  # patch 11: the burst after it splits frames
async def test_a_black_hole_on_the_link_neither_stalls_the_caller_nor_loses_a_mark(
    linked: tuple[NetNs, Rig],
) -> None:
    """3 s in which every packet between Asterisk and the bot is dropped, no reset."""
    ns, rig = linked

    async def black_hole() -> None:
        await asyncio.sleep(2)
        await ns.shape(Shape.black_hole(), Shape.black_hole())
        await asyncio.sleep(3)
        await ns.shape()

    async with rig.call() as call:
        sent = await stream(call.session, black_hole)
        await call.session.wait_mark(sent[-1], timeout=CHUNKS * 0.2 + 15)
    result = outcome(call.session, call.packets, sent)
    report("link: a 3 s black hole", result.describe())
    assert result.played == sent
    assert result.frames == list(range(CHUNKS * CHUNK_FRAMES))
    assert result.largest_gap_ms < 50


async def test_a_reset_mid_stream_ends_the_call_cleanly(linked: tuple[NetNs, Rig]) -> None:
    """The bot's connection is reset (RST) while its audio is queued: Asterisk hangs
    up at once, no mark is answered twice, and the next call is served."""
    _, rig = linked
    assert rig.asterisk is not None

    async with rig.call() as call:
        s = call.session

        async def reset() -> None:
            await asyncio.sleep(2)
            s.connection.transport.abort()

        sent = await stream(s, reset)
        await call.sip.wait_disconnected(timeout=10)
    result = outcome(s, call.packets, sent)
    report("link: a reset mid-stream", result.describe())
    assert result.played, "marks were played before the reset"
    assert result.unanswered, "the bot had marks pending when it reset"
    played = result.played
    assert played == sent[: len(played)], "the marks played are the first ones, in order"
    frames = [f for f in result.frames if f is not None]
    assert frames == list(range(len(frames))), "what the caller heard is in order"
    assert result.largest_gap_ms < 50, "until the hangup, the grid held"
    assert rig.asterisk.running
    async with rig.call() as call:
        await call.session.command("MARK", "next")
        with contextlib.suppress(BotError):
            await call.session.wait_mark("next")
        assert call.session.named("MARK_PLAYED"), "the next call gets its mark"
