"""Command line: ``python -m harness demo`` places one real call with marks.

The only module that prints; everything else logs. Logs go to
``logs/<command>-<time>/`` (``HARNESS_DEBUG=1`` adds debug detail).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from astmarks.pacer import Pacer
from astmarks.protocol import MARK_CLEARED_EVENTS, MARK_REACHED_EVENTS, ControlFormat, Event
from harness import (
    analysis,
    audio,
    bench,
    demobot,
    fuzz,
    instructions,
    netns,
    report,
    soak,
    testsuite,
    tts,
)
from harness.asterisk import REPO_ROOT, AsteriskError, find_install
from harness.bot import BotError
from harness.caller import CallerError
from harness.capture import CaptureError, check_capture_possible
from harness.ports import parse_host_port
from harness.rig import Rig
from harness.topology import DIAL, TOPOLOGIES, Topology, topology

#: Where ``bench --update-docs`` puts the latest full run's tables.
BENCHMARK_DOC = "docs/BENCHMARK.md"

log = logging.getLogger("harness.cli")

DEMO_TEXT = (
    "Hello. This audio is streamed by a bot over Asterisk's WebSocket channel, "
    "in chunks of uneven size, as a text to speech engine makes them. After each chunk "
    "the bot places a mark, and Asterisk tells it when the audio before the mark has "
    "been played."
)


ACK_EVENTS = MARK_REACHED_EVENTS


class Progress:
    """Step lines with elapsed time, for a person watching."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()

    def __call__(self, message: str) -> None:
        print(f"[{time.monotonic() - self.t0:6.2f}s] {message}", flush=True)


def setup_logging(command: str) -> Path:
    logdir = REPO_ROOT / "logs" / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}"
    logdir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(logdir / "harness.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    root.addHandler(handler)
    if os.environ.get("HARNESS_DEBUG"):
        # The harness's and the client library's own detail (every command
        # and event), not websockets' (every frame at debug level).
        for name in ("harness", "astmarks"):
            logging.getLogger(name).setLevel(logging.DEBUG)
    return logdir


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
        else audio.render_prompt(args.text)
    )
    say(f"prompt: {prompt.ms / 1000:.2f} s of μ-law from {prompt.source}")
    fmt = ControlFormat(args.format)
    where: Topology = args.topology
    say(f"starting Asterisk ({flavour}: {install.resolve()})")
    async with Rig(install, logdir, name=f"asterisk-{flavour}", ari=where.needs_ari) as rig:
        say(f"Asterisk up: SIP {rig.sip_host}:{rig.sip_port}, bot at {rig.bot.uri}")
        say(f"calling: pjsua2 -> PJSIP -> {where.description} ({where})")
        async with rig.call(control_format=fmt, pcap=logdir / "rtp.pcap", topology=where) as call:
            session = call.session
            pacer = Pacer(session, target_ms=args.target_ms)
            caps = await session.started()
            how = (
                "MARK_MEDIA in mark positions mode"
                if caps.marks
                else "MARK_MEDIA and a clock (no mark positions mode here)"
            )
            say(
                f"connected ({fmt.value}); streaming the prompt as a TTS engine would, "
                f"a mark per chunk with {how}, about {args.target_ms:.0f} ms queued"
            )
            playing = asyncio.create_task(pacer.play(tts.speak(prompt.ulaw)))
            if args.barge_in is not None:
                await asyncio.sleep(args.barge_in)
                say(f"the caller barges in after {args.barge_in:.1f} s: flushing")
                pacer.barge_in()
            result = await playing
            if not result.interrupted:
                await result.played(timeout=10.0)
            await asyncio.sleep(0.3)
            say("hanging up")
        packets = call.packets
    print_events(session.events, call.started)
    sent = prompt.ulaw[: result.sent_bytes]
    # A mixer adds the other parties' audio, and holds back the last partial
    # interval of the stream until more audio comes.
    stream = analysis.StreamMap(packets, sent, mixed=where.mixes)
    # (The pacer completes the last frame with silence: nothing is held then.)
    held = min(session.bytes_sent % audio.FRAME_BYTES, len(sent)) if where.mixes else 0
    acks = [(e.mark_id, e.t) for e in session.named(*ACK_EVENTS) if e.mark_id]
    placed = [(m.mark_id, m.offset) for m in result.marks]
    marks = analysis.mark_report(placed, acks, stream)
    cleared = {e.mark_id for e in session.named(*MARK_CLEARED_EVENTS)}
    unanswered = sum(1 for m, _ in placed if m not in cleared) - marks.acked
    clean = stream.lost == 0 and stream.unmatched == 0
    print()
    print("Summary")
    print(f"  build:            {flavour} ({install.resolve()})")
    bridge = f", {call.bridged.technology} bridge" if call.bridged else ""
    print(f"  topology:         {where}: {where.description}{bridge}")
    print(
        f"  prompt:           {prompt.ms / 1000:.2f} s; {len(result.chunks)} chunks of "
        "uneven size sent"
    )
    print(
        f"  RTP to caller:    {len(packets)} packets; {audio.ms_of(stream.total):.1f} of "
        f"{audio.ms_of(len(sent)):.1f} ms sent arrived "
        + ("mixed with the other parties' audio" if where.mixes else "byte-exact")
        + ("" if not stream.lost else f", {audio.ms_of(stream.lost):.1f} ms lost")
    )
    print(
        f"  marks:            {marks.marks} placed: {marks.acked} played, {len(cleared)} "
        f"cleared by the flush, {unanswered} unanswered"
    )
    timed = " (marks after audible audio: a mixer's silence fits any quiet byte)"
    print(f"  ack - RTP:        {marks.summary}" + (timed if where.mixes else ""))
    ok = clean and unanswered == 0
    if result.interrupted:
        heard = audio.ms_of(stream.total)
        print(
            f"  barge-in:         MEDIA_FLUSHED says {result.heard_ms:.1f} ms were heard; "
            f"RTP carried {heard:.1f} ms"
        )
        slack = audio.FRAME_MS + where.mixing_interval_ms
        ok = ok and result.heard_ms is not None and abs(result.heard_ms - heard) <= slack
    else:
        # (Held bytes that are silence cannot be told from silence that left.)
        ok = ok and len(sent) - held <= stream.total <= len(sent)
        if held:
            print(f"  held by the mixer: the last {audio.ms_of(held):.1f} ms (a partial interval)")
    print(f"  logs:             {logdir}")
    print("  result:           " + ("OK" if ok else "INCOMPLETE"))
    return 0 if ok else 1


async def fuzz_command(args: argparse.Namespace) -> int:
    say = Progress()
    logdir = setup_logging("fuzz")
    install = Path(args.install) if args.install else find_install("patched")
    check_capture_possible()
    formats = [ControlFormat(args.format)] if args.format != "both" else list(ControlFormat)
    seed = args.seed if args.seed is not None else int(time.time())
    say(f"fuzzing {install} with {args.messages} messages per format (seed {seed})")
    say(f"logs in {logdir}")
    ok = True
    async with Rig(install, logdir / "rig") as rig:
        for fmt in formats:
            async with rig.call(control_format=fmt) as call:
                result = await fuzz.run(call.session, fmt, args.messages, seed, progress=say)
            result.timing(call.packets)
            say(result.summary())
            for failure in result.failures:
                print(f"  FAILED: {failure}")
            ok = ok and result.ok
        if rig.asterisk is not None and not rig.asterisk.running:
            print("  FAILED: Asterisk is not running any more")
            ok = False
    print("result: " + ("OK" if ok else "FAILED") + f" (seed {seed}; logs in {logdir})")
    return 0 if ok else 1


async def soak_command(args: argparse.Namespace) -> int:
    say = Progress()
    logdir = setup_logging("soak")
    install = Path(args.install) if args.install else find_install("patched")
    cfg = soak.SoakConfig(
        calls=args.calls, seconds=args.minutes * 60, seed=args.seed, marks=not args.no_marks
    )
    say(f"logs in {logdir}")
    result = await soak.run(install, logdir, cfg, say)
    print(f"result: {result.summary()}")
    for failure in result.failed_calls[:20]:
        print(f"  a call failed: {failure}")
    print("result: " + ("OK" if result.ok else "FAILED"))
    return 0 if result.ok else 1


def testsuite_command(args: argparse.Namespace) -> int:
    say = Progress()
    logdir = setup_logging("upstream-testsuite")
    say(f"upstream's testsuite, {testsuite.TESTS_DIR}; logs in {logdir}")
    builds = [
        b
        for b in testsuite.DEFAULT_BUILDS
        if not args.build or any(x in b.label for x in args.build)
    ]
    if not builds:
        names = ", ".join(b.label for b in testsuite.DEFAULT_BUILDS)
        print(
            f"astmarks: error: no build matches {args.build}: the builds are {names}",
            file=sys.stderr,
        )
        return 2
    results = testsuite.run(builds, only=args.only or (), say=say)
    print()
    print(testsuite.summary(results))
    found = testsuite.problems(results)
    for problem in found:
        print(f"  PROBLEM: {problem}")
    for result in results:
        for test in result.tests:
            if test.flaky:
                print(f"  FLAKY: {test.name} on {result.label}: {test.earlier[0][:300]}")
    print(
        "result: "
        + ("FAILED" if found else "OK: upstream's tests pass everywhere, ours only with the series")
    )
    return 1 if found else 0


def bench_command(args: argparse.Namespace) -> int:
    say = Progress()
    logdir = setup_logging("bench")
    cfg = bench.BenchConfig.quick() if args.quick else bench.BenchConfig()
    if args.only:
        unknown = sorted(set(args.only) - set(bench.SECTIONS))
        if unknown:
            print(
                f"astmarks: error: no benchmark section {', '.join(unknown)}: the sections "
                f"are {', '.join(bench.SECTIONS)}",
                file=sys.stderr,
            )
            return 2
        cfg = dataclasses.replace(cfg, sections=tuple(s for s in bench.SECTIONS if s in args.only))
    check_capture_possible()
    if "link" in cfg.sections:
        netns.check_possible()
        for stale in netns.remove_stale():
            say(f"removed {stale}, left by a run that did not clean up")
    if "instructions" in cfg.sections:
        instructions.check_possible()
    installs = {"patched": find_install("patched"), "upstream": find_install("upstream")}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    say(f"benchmark ({'quick' if args.quick else 'full'}): results in {out}, logs in {logdir}")

    results: dict[str, Any] = {}
    try:
        asyncio.run(_bench(installs, cfg, out, say, results))
    except asyncio.CancelledError:  # SIGTERM
        raise KeyboardInterrupt from None
    finally:
        if results and "elapsed_s" not in results:
            # What the parts that ended had measured, for a person to look at.
            (out / "bench.partial.json").write_text(json.dumps(results, indent=2))
            say(f"the parts that ended are in {out / 'bench.partial.json'}")
    (out / "bench.json").write_text(json.dumps(results, indent=2))
    (out / "bench.partial.json").unlink(missing_ok=True)
    table = report.markdown(results)
    (out / "bench.md").write_text(table)
    for path in report.plots(results, out):
        say(f"plot: {path}")
    if args.update_docs and (args.only or args.quick):
        say(f"{BENCHMARK_DOC}: left as it is (it shows a whole, full run)")
    elif args.update_docs and report.update_readme(REPO_ROOT / BENCHMARK_DOC, table):
        say(f"{BENCHMARK_DOC}: benchmark table updated")
    print()
    print(table)
    return 0


async def _bench(
    installs: dict[str, Path],
    cfg: bench.BenchConfig,
    out: Path,
    say: Progress,
    results: dict[str, Any],
) -> None:
    """bench.run, stopped by SIGTERM as by ^C: the task is cancelled, and what
    the run started (namespaces, chains, Asterisks, load) is stopped."""
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    await bench.run(installs, cfg, out, say, results)


async def bot_command(args: argparse.Namespace) -> int:
    logdir = setup_logging("bot")
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(console)
    host, port = args.listen
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with demobot.DemoBot(host, port, greeting=args.text) as bot:
        log.info("demo bot: listening on %s (logs in %s)", bot.uri, logdir)
        await stop.wait()
        log.info("demo bot: stopping")
    return 0


def listen_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` for argparse."""
    try:
        return parse_host_port(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def topology_argument(text: str) -> Topology:
    try:
        return topology(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


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
    d.add_argument(
        "--topology",
        type=topology_argument,
        default=DIAL,
        metavar="NAME",
        help=f"how the call reaches the bot: {', '.join(TOPOLOGIES)} (default dial)",
    )
    d.add_argument("--text", default=DEMO_TEXT, help="what the bot says")
    d.add_argument(
        "--target-ms",
        type=float,
        default=40.0,
        help="audio to keep queued in Asterisk (default 40)",
    )
    d.add_argument(
        "--barge-in",
        type=float,
        metavar="SECONDS",
        help="interrupt the prompt after SECONDS and report what was heard",
    )
    bot = sub.add_parser("bot", help="serve the demo bot that Asterisk dials (until stopped)")
    bot.add_argument(
        "--listen",
        type=listen_address,
        default=("127.0.0.1", 8765),
        metavar="HOST:PORT",
        help="where to listen (default 127.0.0.1:8765; 0.0.0.0:8765 in a container)",
    )
    bot.add_argument("--text", default=demobot.GREETING, help="the greeting")
    b = sub.add_parser("bench", help="benchmark marks, pacing and barge-in, patched and upstream")
    b.add_argument("--quick", action="store_true", help="the short version (about three minutes)")
    b.add_argument("--out", default=str(REPO_ROOT / "results" / "latest"))
    b.add_argument(
        "--only",
        action="append",
        metavar="SECTION",
        help=f"only this part (repeatable): {', '.join(bench.SECTIONS)}",
    )
    b.add_argument(
        "--update-docs",
        action="store_true",
        help=f"put the Markdown table in {BENCHMARK_DOC}",
    )
    f = sub.add_parser("fuzz", help="fuzz the control protocol on a real call, with an oracle")
    f.add_argument("--messages", type=int, default=10_000, help="per format (default 10000)")
    f.add_argument("--format", choices=["both", *(c.value for c in ControlFormat)], default="both")
    f.add_argument("--seed", type=int, help="the generator's seed (default: the time)")
    f.add_argument("--install", help="the Asterisk install prefix (default build/asterisk)")
    so = sub.add_parser("soak", help="many concurrent calls for a long time; marks, RSS, fds")
    so.add_argument("--calls", type=int, default=30, help="calls at a time (default 30)")
    so.add_argument("--minutes", type=float, default=10.0, help="how long (default 10)")
    so.add_argument("--seed", type=int, default=1)
    so.add_argument(
        "--no-marks", action="store_true", help="the same calls without marks (a baseline)"
    )
    so.add_argument("--install", help="the Asterisk install prefix (default build/asterisk)")
    ts = sub.add_parser(
        "upstream-testsuite",
        help="upstream's chan_websocket tests (and ours, asterisk-patch/testsuite) on each build",
    )
    ts.add_argument(
        "--build", action="append", help="only the builds whose label has this (repeatable)"
    )
    ts.add_argument(
        "--only", action="append", help="only the tests whose path has this (repeatable)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "demo":
            return asyncio.run(demo(args))
        if args.command == "bench":
            return bench_command(args)
        if args.command == "bot":
            return asyncio.run(bot_command(args))
        if args.command == "fuzz":
            return asyncio.run(fuzz_command(args))
        if args.command == "soak":
            return asyncio.run(soak_command(args))
        if args.command == "upstream-testsuite":
            return testsuite_command(args)
    except (
        testsuite.TestsuiteError,
        subprocess.CalledProcessError,
        netns.NetNsError,
        instructions.InstructionsError,
    ) as exc:
        print(f"astmarks: error: {exc}", file=sys.stderr)
        return 2
    except (AsteriskError, BotError, CallerError, CaptureError, TimeoutError, OSError) as exc:
        print(f"astmarks: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("astmarks: interrupted (what the run had started is stopped)", file=sys.stderr)
        return 130
    return 2
