"""The ``abstream`` command line. Errors a user can cause end in one line and a non-zero exit."""
from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Sequence

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


def run_query(settings: Settings, sql: str) -> tuple[list[str], list[list]]:
    """Columns and rows of a read-only query: through the sink-holding worker's loopback
    endpoint while it owns the embedded ClickHouse, else directly."""
    from streams.warehouse import Warehouse
    from streams.worker import sink_endpoint_file

    endpoint = sink_endpoint_file(settings)
    if settings.embedded_clickhouse and endpoint.exists():
        owner = json.loads(endpoint.read_text())
        if _alive(owner["pid"]):
            url = owner["url"] + "/sql?" + urllib.parse.urlencode({"query": sql})
            try:
                with urllib.request.urlopen(url, timeout=60) as response:
                    body = json.loads(response.read())
            except urllib.error.HTTPError as exc:
                raise CommandError(json.loads(exc.read()).get("error", str(exc))) from None
            except urllib.error.URLError as exc:
                raise CommandError(f"the worker that owns ClickHouse does not answer at {owner['url']}: {exc.reason}") from None
            return body["columns"], body["rows"]
    result = Warehouse(settings.clickhouse_dsn, settings.clickhouse_database).query(sql)
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


def cmd_demo(args: argparse.Namespace) -> int:
    from streams.demo import run_demo

    return run_demo(Settings.from_env(), events=args.events)


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

    p = sub.add_parser("demo", help="run the demo on the embedded defaults (local broker, worker, ClickHouse)")
    p.add_argument("--events", type=int, default=5000, help="simulated events to publish (default 5000)")
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

    p = sub.add_parser("status", help="the newest decision of an experiment: verdict, lift, intervals, SRM")
    p.add_argument("experiment_id", metavar="EXPERIMENT")
    p.add_argument("--json", action="store_true", help="print the Decision record as JSON")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("experiment", help="define experiments and start, pause, stop, list or show them")
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
    from streams.warehouse import WarehouseError

    try:
        if args.command == "simulate" and args.duplicates + args.malformed > args.events:
            raise CommandError("--duplicates plus --malformed cannot exceed --events")
        return args.func(args)
    except (CommandError, ConfigError, SettingsError, LocalKafkaError, TopicError, WarehouseError) as exc:
        print(f"abstream: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
