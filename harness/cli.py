"""Command line: ``python -m harness demo`` places one real call with marks.

The only module that prints; everything else logs. Logs go to
``logs/<command>-<time>/`` (``HARNESS_DEBUG=1`` adds debug detail).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from harness import analysis, audio, bench, report
from harness.asterisk import REPO_ROOT, AsteriskError, find_install
from harness.bot import BotError, BotSession
from harness.caller import CallerError, SipPhone
from harness.capture import CaptureError, check_capture_possible
from harness.events import ControlFormat, Event
from harness.rig import Rig

log = logging.getLogger("harness.cli")

DEMO_TEXT = (
    "Hello. This audio is streamed by a bot over Asterisk's WebSocket channel, "
    "in chunks of two hundred milliseconds. After each chunk the bot places a mark, "
    "and Asterisk tells it when the audio before the mark has been played."
)
CHUNK_BYTES = 1600  # 200 ms of μ-law
AHEAD = 2  # chunks queued in Asterisk ahead of the one playing


class Progress:
    """Step lines with elapsed time, for a person watching."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()

    def __call__(self, message: str) -> None:
        print(f"[{time.monotonic() - self.t0:6.2f}s] {message}", flush=True)


def setup_logging(command: str) -> Path:
    logdir = REPO_ROOT / "logs" / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}"
    logdir.mkdir(parents=True, exist_ok=True)
    level = logging.DEBUG if os.environ.get("HARNESS_DEBUG") else logging.INFO
    handler = logging.FileHandler(logdir / "harness.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.setLevel(level)
    root.addHandler(handler)
    return logdir


def mark_command(session: BotSession) -> tuple[str, str]:
    """MARK on a driver that advertises it in MEDIA_START, else MARK_MEDIA."""
    start = session.media_start
    if start is not None and "MARK" in str(start.get("capabilities", "")).split(","):
        return "MARK", "MARK_PLAYED"
    return "MARK_MEDIA", "MEDIA_MARK_PROCESSED"


async def demo(args: argparse.Namespace) -> int:
    say = Progress()
    logdir = setup_logging("demo")
    flavour = "upstream" if args.upstream else "patched"
    install = find_install(flavour)
    check_capture_possible()
    say(f"rendering the prompt ({'espeak-ng' if not args.tone else 'tone'})")
    prompt = (
        audio.Prompt(audio.tone(440.0, 3000), "tone")
        if args.tone
        else (audio.render_prompt(args.text))
    )
    # Whole 20 ms frames: upstream chan_websocket drops a trailing partial frame.
    prompt = audio.Prompt(audio.pad_to_frames(prompt.ulaw), prompt.source)
    say(f"prompt: {prompt.ms / 1000:.1f} s of μ-law from {prompt.source}")
    fmt = ControlFormat(args.format)
    say(f"starting Asterisk ({flavour}: {install.resolve()})")
    async with Rig(install, logdir, name=f"asterisk-{flavour}") as rig:
        assert rig.asterisk is not None
        say(f"Asterisk up: SIP 127.0.0.1:{rig.asterisk.sip_port}, bot at {rig.bot.uri}")
        say("calling: pjsua2 -> PJSIP -> Dial(WebSocket/bot) -> bot")
        async with rig.call(control_format=fmt, pcap=logdir / "rtp.pcap") as call:
            session = call.session
            mark_cmd, ack_name = mark_command(session)
            say(f"connected ({fmt.value} control messages); marks with {mark_cmd} -> {ack_name}")
            chunks = audio.chunks(prompt.ulaw, CHUNK_BYTES)
            marks: list[tuple[str, int]] = []
            sent = 0
            for k, chunk in enumerate(chunks):
                if k >= AHEAD:
                    await session.wait_mark(f"chunk-{k - AHEAD}", (ack_name,), timeout=10.0)
                await session.send_audio(chunk)
                sent += len(chunk)
                marks.append((f"chunk-{k}", sent))
                await session.command(mark_cmd, f"chunk-{k}")
            await session.wait_mark(marks[-1][0], (ack_name,), timeout=10.0)
            await asyncio.sleep(0.2)
            say("prompt played; hanging up")
        packets = call.packets
    print_events(session.events, call.started)
    frames = analysis.split_frames(prompt.ulaw)
    times = analysis.departures(packets, frames)
    acks = {e.mark_id: e.t for e in session.named(ack_name) if e.mark_id}
    timings = analysis.mark_timings(marks, acks, times)
    errors = [t.error_ms for t in timings if t.error_ms is not None]
    matched = sum(t is not None for t in times)
    print()
    print("Summary")
    print(f"  build:            {flavour} ({install.resolve()})")
    print(
        f"  prompt:           {prompt.ms / 1000:.2f} s, {len(frames)} frames, {len(chunks)} chunks"
    )
    print(f"  RTP to caller:    {len(packets)} packets; {matched}/{len(frames)} frames byte-exact")
    print(f"  marks:            {len(marks)} sent, {len(acks)} acknowledged ({ack_name})")
    print(f"  ack - RTP:        {analysis.Summary.of(errors)}")
    print(f"  logs:             {logdir}")
    ok = matched == len(frames) and len(acks) == len(marks)
    print("  result:           " + ("OK" if ok else "INCOMPLETE"))
    return 0 if ok else 1


def bench_command(args: argparse.Namespace) -> int:
    say = Progress()
    logdir = setup_logging("bench")
    check_capture_possible()
    installs = {"patched": find_install("patched"), "upstream": find_install("upstream")}
    cfg = bench.BenchConfig.quick() if args.quick else bench.BenchConfig()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    say(f"benchmark ({'quick' if args.quick else 'full'}): results in {out}, logs in {logdir}")

    async def measure() -> dict[str, Any]:
        async with SipPhone(logdir / "pjsua2") as phone:
            return await bench.run(installs, cfg, out, phone, say)

    results = asyncio.run(measure())
    (out / "bench.json").write_text(json.dumps(results, indent=2))
    table = report.markdown(results)
    (out / "bench.md").write_text(table)
    for path in report.plots(results, out):
        say(f"plot: {path}")
    if args.update_readme and report.update_readme(REPO_ROOT / "README.md", table):
        say("README.md: benchmark table updated")
    print()
    print(table)
    return 0


def print_events(events: Sequence[Event], t0: float) -> None:
    print()
    print("Events from Asterisk (ms since the call was up)")
    for event in events:
        print(f"  {1000 * (event.t - t0):8.1f}  {event.raw[:160]}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="astmarks", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="place one real call in which the bot streams a prompt")
    d.add_argument("--format", choices=[f.value for f in ControlFormat], default="plain-text")
    d.add_argument("--upstream", action="store_true", help="use build/asterisk-upstream")
    d.add_argument("--tone", action="store_true", help="stream a tone, not speech")
    d.add_argument("--text", default=DEMO_TEXT, help="what the bot says")
    b = sub.add_parser("bench", help="benchmark marks, pacing and barge-in, patched and upstream")
    b.add_argument("--quick", action="store_true", help="the short version (about a minute)")
    b.add_argument("--out", default=str(REPO_ROOT / "results" / "latest"))
    b.add_argument(
        "--update-readme", action="store_true", help="put the Markdown table in README.md"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "demo":
            return asyncio.run(demo(args))
        if args.command == "bench":
            return bench_command(args)
    except (AsteriskError, BotError, CallerError, CaptureError, TimeoutError) as exc:
        print(f"astmarks: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 2
