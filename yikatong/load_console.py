"""What ``yikatong load`` shows on the terminal: the live progress line (with the generator's lag in red when it
falls behind its timetable) and the summary at the end."""

from __future__ import annotations

import sys
from typing import TextIO

from yikatong.load_report import HotlistDoc, LoadSummary, SweepDoc, schedule_line
from yikatong.load_schedule import LATE
from yikatong.load_stats import Counts, percentiles
from yikatong.loadgen import Progress

RED, RESET = "\033[31m", "\033[0m"


def red(text: str, colour: bool) -> str:
    """``text`` in red on a terminal; marked with ``!`` around it otherwise (a log file keeps no colour)."""
    return f"{RED}{text}{RESET}" if colour else f"!{text}!"


class Printer:
    """The live progress line: redrawn in place on a terminal, one line a second otherwise."""

    def __init__(self, stream: TextIO = sys.stderr) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.shown = False

    def line(self, p: Progress, note: str = "") -> str:
        """The progress line of ``p``."""
        if p.phase == "connecting":
            return f"connecting {p.connected:,}/{p.terminals:,} terminals ({p.elapsed:.0f} s)"
        if p.phase == "draining":
            return f"{note}draining: {p.queued:,} records wait for their ack ({p.acked:,}/{p.generated:,} acked)"
        last = p.last or Counts()
        p99 = percentiles(last.latency)["p99"]
        tail = f"  p99 {p99:,.0f} ms" if p99 is not None else ""
        line = (
            f"{note}{p.elapsed:4.0f} s  offered {last.offered:,}/s  made {last.generated:,}/s  acked "
            f"{last.acked:,}/s{tail}  waiting {p.queued:,}  connected {p.connected:,}/{p.terminals:,}"
            f"  rejected {p.rejected:,}"
        )
        if p.lag > LATE or last.late:
            line += "  " + red(f"BEHIND SCHEDULE by {p.lag:.2f} s ({p.late:,} taps late so far)", self.tty)
        return line

    def show(self, p: Progress, note: str = "") -> None:
        """Draw the line of ``p``."""
        line = self.line(p, note)
        self.stream.write("\r\033[K" + line if self.tty else line + "\n")
        self.stream.flush()
        self.shown = True

    def done(self) -> None:
        """End the line drawn in place."""
        if self.tty and self.shown:
            self.stream.write("\n")


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f} ms"


def print_summary(doc: LoadSummary, colour: bool | None = None) -> None:
    """The summary lines of a run on stdout (the schedule line red when the generator fell behind)."""
    colour = sys.stdout.isatty() if colour is None else colour
    lat = doc["latency_ms"]
    ms = "  ".join(f"{k} {v if v is not None else '-'} ms" for k, v in lat.items())
    schedule = schedule_line(doc["schedule"])
    print()
    connected = f"{doc['connected']:,} connected, {doc['connect_seconds']} s to connect"
    print(f"broker           {doc['settings']['broker']}; clearing {doc['settings']['clearing']}")
    print(f"terminals        {doc['terminals']:,} ({connected}; {doc['workers']} worker process(es))")
    print(f"offered          {doc['offered']:,} taps")
    print(f"schedule         {red(schedule, colour) if doc['schedule']['behind'] else schedule}")
    print(f"made             {doc['generated']:,} records ({doc['generated_per_second']:,}/s)")
    print(f"acked            {doc['acked']:,} records ({doc['acked_per_second']:,}/s during the load)")
    print(f"ack latency      {ms} (from each tap's moment)")
    if doc["resent"]:
        resent = red(f"{doc['resent']:,}", colour)
        print(f"sent again       {resent} records (no ack in time, or reconnects)")
    print(f"rejected         {doc['rejected']:,}")
    print(f"unacked at end   {doc['unacked']:,} (after {doc['drain_seconds']} s of draining)")
    if doc["sweep"] is not None:
        _print_sweep(doc["sweep"], colour)
    if doc["hotlist"] is not None:
        _print_hotlist(doc["hotlist"])
    metrics = doc["clearing_metrics"]
    if metrics is not None:
        for city, figures in metrics["cities"].items():
            commit = figures["batch_commit_ms"]
            print(
                f"clearing {city}    stored {figures['records_stored']:,}, queue depth max "
                f"{figures['queue_depth_max']:,.0f}, batch commit p50 {_ms(commit['p50'])} p99 {_ms(commit['p99'])}, "
                f"ack lag p99 {_ms(figures['ack_lag_ms']['p99'])}"
            )
        for error in metrics["errors"]:
            print(f"metrics          {error}")


def _print_sweep(sweep: SweepDoc, colour: bool) -> None:
    print(f"sweep            p99 SLO {sweep['slo_ms']:,.0f} ms")
    for step in sweep["steps"]:
        lat = step["latency_ms"]
        late = f", {step['late']:,} taps late (up to {step['max_lag_s']:.2f} s)" if step["late"] else ""
        if step["cpu_busy"] is not None:
            late += f", CPU {step['cpu_busy']:.0%} busy"
        verdict = "held" if step["held"] else red("missed", colour)
        print(
            f"  {step['rate']:>9,.0f}/s  acked {step['acked']:,}/{step['generated']:,}  p50 {_ms(lat['p50'])}  "
            f"p99 {_ms(lat['p99'])}  p99.9 {_ms(lat['p99.9'])}  max {_ms(lat['max'])}{late}  {verdict}"
        )
    held = sweep["held_rate"]
    print(f"highest held     {f'{held:,.0f} taps/s' if held is not None else red('none', colour)}; {sweep['limit']}")


def _print_hotlist(news: HotlistDoc) -> None:
    if news["at"] is None:
        print("hotlist          not added: the load ended before --hotlist-at")
        return
    lists = ", ".join(
        f"{issuer} version {version}, published in {_ms(news['published_ms'][issuer])}"
        for issuer, version in news["versions"].items()
    )
    held = news["holding_ms"]
    print(
        f"hotlist          {len(news['cards']):,} card(s) added at {news['at']:.1f} s ({lists}); "
        f"{news['holding']:,} terminals hold it, from the add: p50 {_ms(held['p50'])}  p99 {_ms(held['p99'])}"
    )
    refusals = "  ".join(
        f"{city} {_ms(first)} ({news['refusals'][city]:,} refused)" for city, first in news["first_refusal_ms"].items()
    )
    print(f"first refusal    {refusals}")
    print(
        f"listed cards     {news['taken']:,} record(s) taken after the add before the terminal held the list, "
        f"{news['rejected']:,} rejected by the clearing"
    )
    for issuer, version in news["ahead"].items():
        print(
            f"note: terminals held version {version} of {issuer}'s hotlist before the add made version "
            f"{news['versions'][issuer]}: a list retained on the broker by another database; they ignore the new one"
        )
