"""The demo's live terminal view (rich) and its closing lines: per experiment its traffic,
the primary metric's lift with its always-valid interval, the verdict, alerts, and what
its story is about; above them the simulated clock."""
from __future__ import annotations

import datetime
from typing import Any

from rich.console import Group
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from streams.codec import ControlKind


def clock(ms: int) -> str:
    """Simulated time of day, e.g. ``13:20``; ``24:00`` at the end of the day."""
    from streams.demo import DAY_S, START_MS

    if ms >= START_MS + DAY_S * 1000:
        return "24:00"
    return datetime.datetime.fromtimestamp(ms / 1000, datetime.timezone.utc).strftime("%H:%M")


def _pct(x: float | None, spec: str = "+.1%") -> str:
    return "n/a" if x is None else format(x, spec)


def _traffic(day, experiment_id: str, config) -> Text:
    from streams.demo import SRM

    units = day.traffic.units.get(experiment_id, {})
    if experiment_id == SRM:
        served = {"control": 0.55, "treatment": 0.45}  # what the buggy router really does
    else:
        served = day.router.weights(experiment_id)
    text = Text()
    for i, name in enumerate(config.variant_names):
        share = served.get(name, 0.0)
        style = "bold red" if share == 0 and name != config.control and units.get(name) else ""
        text.append(("\n" if i else "") + f"{name} {share:.0%}", style=style)
        text.append(f" ({units.get(name, 0):,})", style="dim")
    return text


def _lift(decision: dict | None) -> str:
    if decision is None:
        return "-"
    primary = [c for c in decision["comparisons"] if c["primary"]]
    if not primary or primary[0]["lift"] is None:
        return "-"
    c = primary[0]
    return f"{_pct(c['lift'])} [{_pct(c['ci_low'])}, {_pct(c['ci_high'])}]"


def _verdict(decision: dict | None) -> Text:
    if decision is None:
        return Text("waiting", style="dim")
    verdict = decision["verdict"]
    style = {"ship": "bold green", "stop_harm": "bold red", "continue": "", "inconclusive": "yellow"}[verdict]
    return Text(verdict + (f" {decision['verdict_variant']}" if decision["verdict_variant"] else ""), style=style)


def _alerts(alerts: list[dict]) -> Text:
    latest: dict[tuple[str, str], dict] = {}
    for a in alerts:
        latest[(a["guardrail"], a["variant"])] = a
    text = Text()
    for (guardrail, variant), a in latest.items():
        if text:
            text.append(", ")
        text.append(f"{guardrail} {a['state']}", style="bold red" if a["state"] == "firing" else "green")
    return text or Text("-", style="dim")


def _note(experiment_id: str, day, view, decision: dict | None) -> str:
    from streams import demo

    if experiment_id == demo.CANARY:
        allocations = view.of(ControlKind.ALLOCATION, experiment_id)
        promoted = any(k["action"] == "promote" for k in view.of(ControlKind.KILLSWITCH, experiment_id))
        share = allocations[-1]["weights"]["challenger"] if allocations else demo.CANARY_STEPS[0]
        step = "promoted to 100%" if promoted else f"canary step {demo.CANARY_STEPS.index(share) + 1}/4 ({share:.0%})"
        ship = demo.first_ship(view.of(ControlKind.DECISION, experiment_id))
        if ship is None:
            return f"{step}; no verdict yet"
        return (f"{step}; ship after {ship.units:,} units (a fixed-horizon test: {ship.fixed_planned:,} for the "
                f"planned +{demo.CANARY_PLANNED_MDE:.0%} MDE, {ship.fixed_true:,} for the true +50%)")
    if experiment_id == demo.LATENCY:
        kills = [k for k in view.of(ControlKind.KILLSWITCH, experiment_id) if k["action"] == "kill"]
        if not kills:
            return "challenger slows down x3 at 12:00"
        seen = day.kill_seen_ms
        return (f"killed at {clock(kills[0]['event_time'])}; router sends it nothing since "
                f"{clock(seen) if seen else '...'}")
    if experiment_id == demo.SHADOW:
        alerts = [a for a in view.of(ControlKind.ALERT, experiment_id) if a["state"] == "firing"]
        if alerts:
            return f"v3 disagrees with v1 on {alerts[-1]['observed']:.1%} of requests (limit {alerts[-1]['threshold']:.0%})"
        return "v3 runs in shadow on every request"
    if experiment_id == demo.AA:
        k, n = demo.peeking(view.of(ControlKind.DECISION, experiment_id))
        return f"naive peeking would have declared a winner at {k} of {n} looks"
    if experiment_id == demo.SRM and decision is not None:
        units = {v["variant"]: v["units"] for v in decision["variants"]}
        total = sum(units.values()) or 1
        split = "/".join(f"{units.get(v, 0) / total:.1%}" for v in ("control", "treatment"))
        p = decision["srm_p_value"]
        return f"planned 50/50, got {split}; SRM p = {p:.1g}" if p is not None else f"planned 50/50, got {split}"
    return ""


def render(day, view, configs: dict[str, Any], sim_ms: int, end_ms: int, pace, *, waiting: bool = False,
           notes: bool = True) -> Group:
    """The live view at simulated time ``sim_ms``; without the notes under the table in the
    last frame, which the closing lines (:func:`story_lines`) tell from the whole run."""
    from streams.demo import DAY_S, EXPERIMENTS, START_MS, STORIES

    done = (sim_ms - START_MS) / (end_ms - START_MS)
    published = sum(day.traffic.published.values())
    head = Text.assemble(("simulated day 2026-01-01 ", "bold"), (clock(sim_ms), "bold cyan"),
                         f"  ({pace.speed:.0f}x the wall clock)  {published:,} events published",
                         ("  waiting for the workers to catch up" if waiting else "", "yellow"))
    table = Table(pad_edge=False, box=None, header_style="bold", padding=(0, 1))
    for name in ("experiment", "traffic now (units)", "lift [always-valid 95%]", "verdict", "alerts"):
        table.add_column(name)
    lines = []
    for i, experiment_id in enumerate(EXPERIMENTS, 1):
        decision = view.latest_decision(experiment_id)
        # After a promotion control serves no one and the decision compares nothing: show the
        # last look that compared the challenger with control.
        compared = [d for d in view.of(ControlKind.DECISION, experiment_id)
                    if any(c["primary"] and c["lift"] is not None for c in d["comparisons"])]
        if decision is not None and compared and not any(c["primary"] for c in decision["comparisons"]):
            decision = max(compared, key=lambda d: d["decision_time"])
        name = Text.assemble((f"{i}. {experiment_id}", "bold"), "\n", (STORIES[experiment_id], "dim"))
        table.add_row(name, _traffic(day, experiment_id, configs[experiment_id]), _lift(decision), _verdict(decision),
                      _alerts(view.of(ControlKind.ALERT, experiment_id)), end_section=True)
        if notes:
            lines.append(Text.assemble((f"{i}. ", "bold"), _note(experiment_id, day, view, decision)))
    return Group(head, ProgressBar(total=DAY_S, completed=done * DAY_S), table, *([Text("")] + lines if lines else []))


def story_lines(summary: dict) -> list[str]:
    """What each story ended as, one line each, from the run's summary."""
    from streams import demo

    lines = []
    ship = summary["canary_ship"]
    if ship:
        lines.append(f"1. {demo.CANARY}: ship after {ship['units']:,} units; a fixed-horizon test at the same split "
                     f"(alpha 5%, power 80%) needs {ship['fixed_planned']:,} for the planned +15% MDE, "
                     f"{ship['fixed_true']:,} had it known the true +50%")
    else:
        lines.append(f"1. {demo.CANARY}: no ship verdict this run (the always-valid interval still covered 0)")
    lines[-1] += "; canary promoted to 100%" if summary["canary_promoted"] else "; canary not promoted"
    kill, seen = summary["kill_event_time"], summary["kill_seen_by_router_time"]
    lines.append(f"2. {demo.LATENCY}: " + (f"p95 latency alert and kill at {clock(kill)}; the router sent the challenger "
                                          f"no unit from {clock(seen)} on" if kill and seen else "no kill this run"))
    shadow = [a for a in summary["alerts"] if a["experiment_id"] == demo.SHADOW and a["state"] == "firing"]
    lines.append(f"3. {demo.SHADOW}: " + (f"shadow alert, {shadow[0]['observed']:.1%} disagreement (limit 5%)"
                                         if shadow else "no shadow alert this run"))
    aa = summary["aa_peeking"]
    lines.append(f"4. {demo.AA}: verdicts {', '.join(summary['verdicts_seen'][demo.AA])}; naive peeking would have "
                 f"declared a winner at {aa['winner_looks']} of {aa['looks']} looks")
    srm = [a for a in summary["alerts"] if a["experiment_id"] == demo.SRM and a["guardrail"] == "srm"]
    lines.append(f"5. {demo.SRM}: " + ("SRM alert fired; every verdict is held at continue" if srm else "no SRM alert this run"))
    return lines
