"""The ``abstream`` command line. Errors a user can cause end in one line and a non-zero exit."""
from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping, Sequence

from streams.settings import Settings, SettingsError

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


class CommandError(Exception):
    """A command could not do what was asked; the message is the one line the user sees."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not argparse's usage dump
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _settings(args: argparse.Namespace) -> Settings:
    return Settings.from_env(kafka_bootstrap=getattr(args, "bootstrap", None))


def _kafka_data_dir(args: argparse.Namespace, settings: Settings) -> Path:
    return Path(args.data_dir) if args.data_dir else settings.home / "kafka"


def cmd_kafka(args: argparse.Namespace) -> int:
    from streams import local_kafka

    settings = Settings.from_env()
    data_dir = _kafka_data_dir(args, settings)
    if args.action == "start":
        status = local_kafka.start(data_dir=data_dir, port=args.port)
    elif args.action == "stop":
        stopped = local_kafka.stop(data_dir=data_dir)
        status = local_kafka.status(data_dir=data_dir, port=args.port)
        if not args.json:
            print("stopped" if stopped else "not running")
            return EXIT_OK
    else:
        status = local_kafka.status(data_dir=data_dir, port=args.port)
    if args.json:
        print(json.dumps({"running": status.running, "pid": status.pid, "bootstrap": status.bootstrap,
                          "data_dir": str(status.data_dir), "log_file": str(status.log_file)}))
    elif status.running:
        print(f"kafka running at {status.bootstrap} (pid {status.pid}, data {status.data_dir})")
    else:
        print("kafka not running")
    return EXIT_OK if status.running or args.action == "stop" else EXIT_FAILURE


def cmd_sink(args: argparse.Namespace) -> int:
    from streams.sink import run_sink_service

    overrides = {"web_port": args.web_port}
    settings = Settings.from_env(**{k: v for k, v in overrides.items() if v is not None})
    run_sink_service(settings)
    return EXIT_OK


def cmd_worker(args: argparse.Namespace) -> int:
    from streams.worker import run_worker

    overrides = {"web_port": args.web_port}
    settings = Settings.from_env(**{k: v for k, v in overrides.items() if v is not None})
    run_worker(settings, sink=args.sink, loglevel=args.loglevel)
    return EXIT_OK


def cmd_simulate(args: argparse.Namespace) -> int:
    from streams.simulate import simulated_messages
    from streams.topics import ensure_topics

    settings = _settings(args)
    ensure_topics(settings)
    messages = simulated_messages(args.events, duplicates=args.duplicates, malformed=args.malformed,
                                  n_units=args.units, seed=args.seed, run_id=args.run_id)
    delivered = _publish_with_progress(settings, messages, quiet=args.json)
    counts: dict[str, int] = {}
    for m in messages:
        key = "malformed" if m.record is None else ("duplicate" if m.duplicate else m.kind.value)
        counts[key] = counts.get(key, 0) + 1
    if args.json:
        print(json.dumps({"delivered": delivered, **counts}))
    else:
        print(f"published {delivered} messages: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    return EXIT_OK


def _publish_with_progress(settings: Settings, messages, *, quiet: bool) -> int:
    from rich.progress import Progress

    from streams.simulate import publish

    if quiet:
        return publish(settings, messages)
    with Progress(transient=True) as progress:
        task = progress.add_task("publishing", total=len(messages))
        delivered = publish(settings, messages, on_progress=lambda n: progress.update(task, completed=n))
    return delivered


def run_query(settings: Settings, sql: str, parameters: Mapping[str, Any] | None = None) -> tuple[list[str], list[list]]:
    """Columns and rows of a read-only query: through the sink-holding worker's loopback
    endpoint while it owns the embedded ClickHouse, else directly. ``parameters`` bind the
    query's ``{name:Type}`` placeholders in ClickHouse itself, on both paths."""
    from streams.warehouse import Warehouse
    from streams.sink import sink_endpoint_file

    endpoint = sink_endpoint_file(settings)
    if settings.embedded_clickhouse and endpoint.exists():
        owner = json.loads(endpoint.read_text())
        if _alive(owner["pid"]):
            arguments = {"query": sql, **({"params": json.dumps(dict(parameters))} if parameters else {})}
            url = owner["url"] + "/sql?" + urllib.parse.urlencode(arguments)
            try:
                with urllib.request.urlopen(url, timeout=60) as response:
                    body = json.loads(response.read())
            except urllib.error.HTTPError as exc:
                raise CommandError(json.loads(exc.read()).get("error", str(exc))) from None
            except urllib.error.URLError as exc:
                raise CommandError(f"the worker that owns ClickHouse does not answer at {owner['url']}: {exc.reason}") from None
            return body["columns"], body["rows"]
    result = Warehouse(settings.clickhouse_dsn, settings.clickhouse_database).query(sql, parameters)
    return list(result.column_names), [list(r) for r in result.rows]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cmd_query(args: argparse.Namespace) -> int:
    columns, rows = run_query(Settings.from_env(), args.sql)
    if args.json:
        print(json.dumps({"columns": columns, "rows": rows}, default=str))
        return EXIT_OK
    from rich.console import Console
    from rich.table import Table

    table = Table(*columns)
    for row in rows:
        table.add_row(*(str(v) for v in row))
    Console().print(table)
    return EXIT_OK


def cmd_alerts_bridge(args: argparse.Namespace) -> int:
    from streams.alerts_bridge import run_bridge

    forwarded = run_bridge(Settings.from_env(), args.alertmanager, resend_s=args.resend_s, once=args.once)
    print(f"forwarded {forwarded} alerts to {args.alertmanager}")
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    from streams.decisions import latest_decisions

    decision = latest_decisions(Settings.from_env()).get(args.experiment_id)
    if decision is None:
        raise CommandError(f"no decision for experiment {args.experiment_id!r} yet "
                           "(is it defined and running, and is a worker up?)")
    if args.json:
        print(json.dumps(decision, indent=2))
        return EXIT_OK
    print(render_decision(decision))
    return EXIT_OK


def render_decision(d: dict) -> str:
    """A decision for people: verdict, traffic, and every comparison with its interval."""
    verdict = d["verdict"].replace("_", ": ", 1) if d["verdict"] == "stop_harm" else d["verdict"]
    if d["verdict_variant"]:
        verdict += f" {d['verdict_variant']}"
    lines = [f"{d['experiment_id']} (config v{d['config_version']}): {verdict}", f"  {d['reason']}",
             "  units: " + ", ".join(f"{v['variant']} {v['units']} ({v['weight']:.0%} planned)" for v in d["variants"]),
             f"  sample ratio: sequential p = {_fmt(d['srm_p_value'], '.3g')}" + ("  MISMATCH" if d["srm_flag"] else ""),
             "  outcomes: " + (", ".join(f"{k} {v}" for k, v in sorted(d["outcome_fates"].items())) or "none yet")
             + f"; assignment inconsistencies {d['assignment_inconsistencies']}"]
    for c in d["comparisons"]:
        role = "primary" if c["primary"] else "secondary"
        interval = f"[{_fmt(c['ci_low'], '+.2%')}, {_fmt(c['ci_high'], '+.2%')}]"
        p = _fmt(c["adjusted_p_value"] if not c["primary"] else c["p_value"], ".3g")
        lines.append(f"  {role} {c['metric']}, {c['variant']} vs control: lift {_fmt(c['lift'], '+.2%')} {interval}"
                     f", p {p}, chance to win {_fmt(c['chance_to_win'], '.1%')}")
    return "\n".join(lines)


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _parse_split(text: str) -> list[float]:
    """Shares of "50/50" or "34/33/33" (control first), normalised to sum to 1."""
    try:
        shares = [float(part) for part in text.split("/")]
    except ValueError:
        raise CommandError(f"--split {text!r} is not a list of numbers like 50/50 or 34/33/33") from None
    if len(shares) < 2 or any(not share > 0 for share in shares):
        raise CommandError(f"--split {text!r} needs at least two positive shares, control first (e.g. 50/50)")
    return [share / sum(shares) for share in shares]


def cmd_plan(args: argparse.Namespace) -> int:
    from analysis.planning import duration_days, sample_size
    from analysis.sequential_cost import sequential_cost, simulate_stopping

    shares = _parse_split(args.split)
    if args.simulations < 0:
        raise CommandError(f"--simulations must be 0 or more, got {args.simulations}")
    names = ["control"] + (["treatment"] if len(shares) == 2 else [f"treatment{i}" for i in range(1, len(shares))])
    # The engine compares each treatment with control at alpha / treatments (Bonferroni).
    alpha_each = args.alpha / (len(shares) - 1)
    change = args.mde * args.baseline if not args.absolute else args.mde
    arms, per_variant, days, sequential_days = [], {names[0]: 0}, [], []
    try:
        for name, share in zip(names[1:], shares[1:]):
            pair = shares[0] + share
            plan = sample_size(args.baseline, args.mde, relative=not args.absolute, sd=args.sd, alpha=alpha_each,
                               power=args.power, two_sided=not args.one_sided, treatment_share=share / pair)
            cost = sequential_cost(plan, args.method)
            simulated = (simulate_stopping(args.baseline, change, cost, alpha=alpha_each, treatment_share=share / pair,
                                           sd=args.sd, experiments=args.simulations, seed=args.seed)
                         if args.simulations else None)
            arm = {"variant": name, "n_control": plan.n_control, "n_treatment": plan.n_treatment,
                   "effect_size": plan.effect_size, "sequential": {**cost.to_dict(),
                                                                   "simulation": simulated and simulated.to_dict()}}
            if args.daily_traffic is not None:
                arm["duration_days"] = duration_days(plan, args.daily_traffic * pair)
                max_plan = replace(plan, n_control=cost.n_control_max, n_treatment=cost.n_treatment_max)
                arm["sequential"]["max_duration_days"] = duration_days(max_plan, args.daily_traffic * pair)
                days.append(arm["duration_days"])
                sequential_days.append(arm["sequential"]["max_duration_days"])
            arms.append(arm)
            per_variant[names[0]] = max(per_variant[names[0]], plan.n_control)
            per_variant[name] = plan.n_treatment
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    result = {
        "metric": "proportion" if args.sd is None else "mean", "baseline": args.baseline, "mde": args.mde,
        "relative": not args.absolute, "target": args.baseline + change, "sd": args.sd, "alpha": args.alpha,
        "alpha_per_comparison": alpha_each, "power": args.power, "two_sided": not args.one_sided,
        "split": dict(zip(names, shares)), "method": args.method, "n_per_variant": per_variant,
        "n_total": sum(per_variant.values()), "daily_traffic": args.daily_traffic,
        "duration_days": max(days) if days else None,
        "sequential_max_duration_days": max(sequential_days) if sequential_days else None, "comparisons": arms,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return EXIT_OK
    print(render_plan(result))
    return EXIT_OK


def render_plan(plan: dict) -> str:
    """A plan for people: fixed-horizon sample and duration, then what anytime validity costs."""
    kind = plan["metric"]
    change = plan["target"] - plan["baseline"]
    sides = "two-sided" if plan["two_sided"] else "one-sided"
    lines = [f"{kind} {plan['baseline']:g} -> {plan['target']:g} (change {change:+.4g}"
             + (f", {plan['mde']:+.1%} relative" if plan["relative"] else "") + ")"
             + (f", sd {plan['sd']:g}" if plan["sd"] is not None else ""),
             f"fixed horizon ({sides}, alpha {plan['alpha_per_comparison']:g} per comparison, power {plan['power']:g}): "
             + ", ".join(f"{v} {n:,}" for v, n in plan["n_per_variant"].items()) + f" units ({plan['n_total']:,} in all)"]
    if plan["duration_days"] is not None:
        split = "/".join(f"{share:.0%}" for share in plan["split"].values())
        lines.append(f"duration at {plan['daily_traffic']:,.0f} units/day split {split}: {plan['duration_days']} days")
    for arm in plan["comparisons"]:
        seq = arm["sequential"]
        prefix = f"{arm['variant']}: " if len(plan["comparisons"]) > 1 else ""
        lines.append(f"{prefix}anytime-valid ({plan['method']}, N* {seq['n_star']:g}): interval {seq['width_ratio']:.2f}x "
                     f"as wide as the fixed one at the planned sample; the same power read only at the end needs up to "
                     f"{seq['n_control_max']:,} + {seq['n_treatment_max']:,} units ({seq['extra_fraction']:+.0%})"
                     + (f", {seq['max_duration_days']} days" if "max_duration_days" in seq else ""))
        sim = seq["simulation"]
        if sim:
            lines.append(f"{prefix}simulated at the MDE ({sim['experiments']:,} experiments, {sim['looks']} looks, seed "
                         f"{sim['seed']}): power {sim['power']:.2f} by that bound, stopping on average after "
                         f"{sim['mean_total_units_at_stop']:,.0f} units in all (fixed horizon: "
                         f"{arm['n_control'] + arm['n_treatment']:,})")
    return "\n".join(lines)




def report_query(settings: Settings):
    """The report's ``query(sql, parameters) -> (columns, rows)`` (see :func:`run_query`)."""
    return lambda sql, parameters: run_query(settings, sql, parameters)


def cmd_report(args: argparse.Namespace) -> int:
    import time

    from rich.progress import Progress

    from analysis.report import ReportError, analyse, collect, collect_steps, to_json, write_report
    from streams.experiments import read_configs
    from streams.stage2 import policy_of

    settings = _settings(args)
    configs = read_configs(settings)
    config = configs.get(args.experiment_id)
    if config is None:
        known = ", ".join(sorted(configs)[:10]) or "none yet"
        raise CommandError(f"no experiment {args.experiment_id!r} is defined (known: {known})")
    query = report_query(settings)
    try:
        if args.json:
            rows = collect(config, query)
        else:
            from rich.console import Console

            with Progress(transient=True, console=Console(stderr=True)) as progress:
                task = progress.add_task("reading ClickHouse", total=collect_steps(config))
                rows = collect(config, query, on_step=lambda name: progress.update(
                    task, advance=1, description=f"reading ClickHouse: {name}"))
    except ReportError as exc:
        raise CommandError(str(exc)) from None
    report = analyse(config, policy_of(config), rows, generated_ms=int(time.time() * 1000))
    out_dir = Path(args.out) if args.out else Path("reports") / config.experiment_id
    paths = write_report(report, out_dir)
    if args.json:
        print(json.dumps({**to_json(report), "files": {k: str(v) for k, v in paths.items()}}, default=str))
        return EXIT_OK
    rec = report.recommendation
    print(f"{config.experiment_id}: {rec.verdict.value}" + (f" {rec.variant}" if rec.variant and rec.verdict.value == "ship" else ""))
    for reason in rec.reasons:
        print(f"  {reason}")
    print(f"wrote {paths['markdown']} and {paths['html']} (+ {len(paths) - 3} plots)")
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from streams.demo import DemoError, run_demo

    try:
        return run_demo(Settings.from_env(), short=args.short, out=args.out)
    except DemoError as exc:
        raise CommandError(str(exc)) from None


def cmd_experiment(args: argparse.Namespace) -> int:
    from streams import experiments

    if args.action == "create":
        config = experiments.load_config_file(args.file)  # a bad file fails before Kafka is asked
    settings = _settings(args)
    scan = experiments.scan_configs(settings)
    if scan.skipped:
        print(f"abstream: warning: {scan.skipped} undecodable records in {experiments.experiments_topic(settings)} skipped",
              file=sys.stderr)
    configs = scan.configs
    if args.action == "list":
        return _print_experiment_list(list(configs.values()), as_json=args.json)
    if args.action == "create":
        current = configs.get(config.experiment_id)
        if current is not None and not args.replace:
            raise CommandError(f"experiment {current.experiment_id} already exists (version {current.version}, "
                               f"{current.status.value}); use --replace to change its definition")
        if current is not None:
            config = experiments.revise(current, config)
        experiments.publish_config(settings, config)
        verb = "replaced" if current is not None else "created"
        _print_experiment_change(config, f"{verb} experiment {config.experiment_id}", as_json=args.json)
        return EXIT_OK
    current = configs.get(args.experiment_id)
    if current is None:
        known = ", ".join(sorted(configs)[:10]) or "none yet"
        raise CommandError(f"no experiment {args.experiment_id!r} in {experiments.experiments_topic(settings)} (known: {known})")
    if args.action == "show":
        return _print_experiment(current, as_json=args.json)
    if args.action in ("kill", "resume"):
        reason = args.reason or f"{args.action} by {os.environ.get('USER', 'an operator')} from the command line"
        switch, allocation = experiments.order(settings, current, args.action, args.variant, reason)
        if args.json:
            print(json.dumps({"killswitch": switch, "allocation": allocation}))
        else:
            weights = ", ".join(f"{v} {w:.0%}" for v, w in sorted(allocation["weights"].items()))
            print(f"{args.action} {args.variant} of experiment {current.experiment_id}: routers now use {weights}")
        return EXIT_OK
    config = experiments.TRANSITIONS[args.action](current)
    experiments.publish_config(settings, config)
    verb = {"start": "started", "pause": "paused", "stop": "stopped"}[args.action]
    _print_experiment_change(config, f"{verb} experiment {config.experiment_id}", as_json=args.json)
    return EXIT_OK


def _print_experiment_change(config, message: str, *, as_json: bool) -> None:
    if as_json:
        print(json.dumps(config.to_record()))
    else:
        print(f"{message} (version {config.version}, {config.status.value})")


def _print_experiment_list(configs: list, *, as_json: bool) -> int:
    configs = sorted(configs, key=lambda c: c.experiment_id)
    if as_json:
        print(json.dumps([
            {"experiment_id": c.experiment_id, "status": c.status.value, "version": c.version, "variants": c.weights,
             "control": c.control, "primary_metric": {"name": c.primary_metric.name, "kind": c.primary_metric.kind.value,
                                                      "direction": c.primary_metric.direction.value}}
            for c in configs
        ]))
        return EXIT_OK
    if not configs:
        print("no experiments")
        return EXIT_OK
    from rich.console import Console
    from rich.table import Table

    table = Table("experiment", "status", "version", "variants", "primary metric")
    for c in configs:
        variants = ", ".join(f"{name} {weight:.0%}" + (" (control)" if name == c.control else "")
                             for name, weight in c.weights.items())
        metric = c.primary_metric
        table.add_row(c.experiment_id, c.status.value, str(c.version), variants,
                      f"{metric.name} ({metric.kind.value}, {metric.direction.value})")
    Console().print(table)
    return EXIT_OK


def _print_experiment(config, *, as_json: bool) -> int:
    if as_json:
        print(json.dumps(config.to_record()))
        return EXIT_OK
    import datetime

    import yaml

    def when(ms):
        return "-" if ms is None else datetime.datetime.fromtimestamp(ms / 1000, datetime.timezone.utc).isoformat(timespec="seconds")

    print(f"# {config.experiment_id}: {config.status.value}, version {config.version}, "
          f"updated {when(config.updated_time_ms)}, started {when(config.started_time_ms)}")
    print(yaml.safe_dump(config.to_mapping(), sort_keys=False).rstrip())
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="abstream", description="Kafka-native experiment processor for A/B tests of ML models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("demo", help="a simulated production day over five experiments (about 4 minutes): "
                                    "canary, kill switch, shadow, A/A, SRM; live view, reports, ClickHouse")
    p.add_argument("--short", action="store_true", help="a smaller, faster day (about 1.5 minutes; the tests use it)")
    p.add_argument("--out", help="folder for the reports (default reports/demo-RUN)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("kafka", help="start, stop or inspect the local single-node Kafka broker")
    p.add_argument("action", choices=("start", "stop", "status"))
    p.add_argument("--port", type=int, default=9092, help="broker port on 127.0.0.1 (default 9092)")
    p.add_argument("--data-dir", help="broker data folder (default $ABSTREAM_HOME/kafka)")
    p.add_argument("--json", action="store_true", help="print the status as JSON")
    p.set_defaults(func=cmd_kafka)

    p = sub.add_parser("worker", help="run a stream worker until interrupted")
    p.add_argument("--sink", action="store_true", help="also hold the ClickHouse sink role (one process per chdb:// DSN)")
    p.add_argument("--web-port", type=int, help="HTTP port for /metrics, /health and /sql (default $ABSTREAM_WEB_PORT or 6066)")
    p.add_argument("--loglevel", default="warning", choices=("debug", "info", "warning", "error"))
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("sink", help="run the ClickHouse sink role in a process of its own until interrupted")
    p.add_argument("--web-port", type=int, help="HTTP port for /metrics, /health and /sql (default $ABSTREAM_WEB_PORT or 6066)")
    p.set_defaults(func=cmd_sink)

    p = sub.add_parser("simulate", help="publish simulated events of all four kinds")
    p.add_argument("--events", type=int, default=5000, help="messages to publish in all (default 5000)")
    p.add_argument("--duplicates", type=int, default=0, help="of which exact duplicates (default 0)")
    p.add_argument("--malformed", type=int, default=0, help="of which malformed messages (default 0)")
    p.add_argument("--units", type=int, default=500, help="unit population (default 500)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--run-id", default="", help="prefix of event ids, so that runs do not share event identities")
    p.add_argument("--bootstrap", help="Kafka bootstrap servers (default $ABSTREAM_KAFKA_BOOTSTRAP)")
    p.add_argument("--json", action="store_true", help="print counts as JSON")
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("query", help="run read-only SQL against abstream's ClickHouse")
    p.add_argument("sql", help="the query; {db} names the abstream database")
    p.add_argument("--json", action="store_true", help="print columns and rows as JSON")
    p.set_defaults(func=cmd_query)

    p = sub.add_parser("alerts-bridge", help="forward guardrail alerts from the alerts topic to Alertmanager")
    p.add_argument("--alertmanager", required=True, metavar="URL", help="Alertmanager's base URL, e.g. http://alertmanager:9093")
    p.add_argument("--resend-s", type=float, default=60.0, help="send firing alerts again this often (default 60)")
    p.add_argument("--once", action="store_true", help="forward what the topic holds, then exit")
    p.set_defaults(func=cmd_alerts_bridge)

    p = sub.add_parser("status", help="the newest decision of an experiment: verdict, lift, intervals, SRM")
    p.add_argument("experiment_id", metavar="EXPERIMENT")
    p.add_argument("--json", action="store_true", help="print the Decision record as JSON")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("plan", help="units per variant and duration for a minimum detectable effect, and the sequential penalty")
    p.add_argument("--baseline", type=float, required=True, help="control's conversion rate (or mean, with --sd)")
    p.add_argument("--mde", type=float, required=True,
                   help="minimum detectable effect, a fraction of the baseline (-0.10 = a 10%% drop) unless --absolute")
    p.add_argument("--absolute", action="store_true", help="--mde is an absolute change, not relative to the baseline")
    p.add_argument("--sd", type=float, help="standard deviation per unit: plan for a mean instead of a proportion")
    p.add_argument("--alpha", type=float, default=0.05, help="significance level (default 0.05)")
    p.add_argument("--power", type=float, default=0.8, help="power against the MDE (default 0.8)")
    p.add_argument("--one-sided", action="store_true", help="one-sided fixed-horizon test (default two-sided)")
    p.add_argument("--split", default="50/50", help="traffic shares, control first (default 50/50; e.g. 34/33/33)")
    p.add_argument("--daily-traffic", type=float, help="new units per day entering the experiment: print the duration")
    p.add_argument("--method", choices=("sequential", "msprt"), default="sequential",
                   help="the anytime-valid test whose penalty to compute (default sequential)")
    p.add_argument("--simulations", type=int, default=2000,
                   help="simulated experiments for the expected stopping sample (default 2000; 0 skips)")
    p.add_argument("--seed", type=int, default=20240601, help="seed of the simulation")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("report", help="the experiment's report from ClickHouse: every test, segments, plots, verdict")
    p.add_argument("experiment_id", metavar="EXPERIMENT")
    p.add_argument("--out", help="folder for report.md, report.html, report.json and the PNGs (default reports/EXPERIMENT)")
    p.add_argument("--bootstrap", help="Kafka bootstrap servers, for the experiment's config (default $ABSTREAM_KAFKA_BOOTSTRAP)")
    p.add_argument("--json", action="store_true", help="print the report's numbers as JSON")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("experiment", help="define experiments; start, pause, stop, kill or resume them; list or show them")
    common = _Parser(add_help=False)
    common.add_argument("--bootstrap", help="Kafka bootstrap servers (default $ABSTREAM_KAFKA_BOOTSTRAP)")
    common.add_argument("--json", action="store_true", help="print the result as JSON")
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True
    a = actions.add_parser("create", parents=[common], help="create an experiment (status draft) from a YAML or JSON file")
    a.add_argument("file", metavar="FILE", help="the experiment's config (see examples/experiments/)")
    a.add_argument("--replace", action="store_true",
                   help="replace an existing experiment's definition, keeping its status and bumping its version")
    for action, text in (("start", "start a draft or paused experiment"), ("pause", "pause a running experiment"),
                         ("stop", "stop a running or paused experiment, for good")):
        a = actions.add_parser(action, parents=[common], help=text)
        a.add_argument("experiment_id", metavar="ID")
    for action, text in (("kill", "stop sending units to a variant now (its share goes to control)"),
                         ("resume", "send units to a killed variant again (the config's weights)")):
        a = actions.add_parser(action, parents=[common], help=text)
        a.add_argument("experiment_id", metavar="ID")
        a.add_argument("--variant", required=True, help="the variant to kill or resume")
        a.add_argument("--reason", help="why, for the kill-switch record (default: who ran the command)")
    actions.add_parser("list", parents=[common], help="list experiments: id, status, version, variants, primary metric")
    a = actions.add_parser("show", parents=[common], help="show an experiment's whole config")
    a.add_argument("experiment_id", metavar="ID")
    p.set_defaults(func=cmd_experiment)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from streams.experiments import ConfigError
    from streams.local_kafka import LocalKafkaError
    from streams.topics import TopicError
    from streams.alerts_bridge import BridgeError
    from streams.warehouse import WarehouseError
    from streams.sink import SinkServiceError
    from streams.codec import SchemaRegistryUnavailable, SchemaRejected

    try:
        if args.command == "simulate" and args.duplicates + args.malformed > args.events:
            raise CommandError("--duplicates plus --malformed cannot exceed --events")
        return args.func(args)
    except (CommandError, ConfigError, SettingsError, LocalKafkaError, TopicError, WarehouseError, BridgeError,
            SinkServiceError, SchemaRegistryUnavailable, SchemaRejected) as exc:
        print(f"abstream: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
