"""Stage 1's fold alone, no Kafka: the cost of a batch by its size and the partitions it touches.

The bench corpus (bench/run.py) is keyed to its partitions by Kafka's default partitioner, cut
into batches of consecutive messages (as a worker's fetch would take them) and folded by
``Stage1.process`` in this process. What a batch costs beyond its events is the fixed cost a
worker pays below capacity, where a batch is a fetch's 50 ms of events (bench/PROFILE.md).

    .venv/bin/python bench/fold.py                          # 4 and 12 partitions, 100 to 4,000 events
    .venv/bin/python bench/fold.py --partitions 12 --batch 400 --profile

Compare figures of one run only: the machine's speed moves between runs.
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for path in (ROOT, ROOT / "bench"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from run import build_corpus  # noqa: E402

from streams.codec import Codec  # noqa: E402
from streams.settings import Settings  # noqa: E402
from streams.stage1 import Stage1, group_by_partition  # noqa: E402
from streams.topics import INPUT_TOPICS, murmur2_partitions  # noqa: E402

WARM_UP_BATCHES = 20


@dataclass
class Message:
    topic: str
    partition: int
    offset: int
    key: bytes
    value: bytes


class Catalogue:
    def __init__(self, configs):
        self.configs = {c.experiment_id: c for c in configs}

    def get(self, experiment_id):
        return self.configs.get(experiment_id)

    def refresh(self, timeout_s: float = 5.0) -> None:
        pass


def measure(corpus, partitions: int, batch_size: int, profile: bool = False) -> dict:
    settings = replace(Settings.from_env({}), partitions=partitions)
    fold = Stage1(settings, Codec(), Catalogue(corpus.configs))
    homes = murmur2_partitions([key.decode() for key in corpus.keys], partitions).tolist()
    offsets: dict[tuple[str, int], int] = {}
    messages = []
    for kind, key, value, partition in zip(corpus.kinds, corpus.keys, corpus.values, homes):
        topic = settings.topic(INPUT_TOPICS[kind])
        offset = offsets[(topic, partition)] = offsets.get((topic, partition), -1) + 1
        messages.append(Message(topic, partition, offset, key, value))
    for partition in range(partitions):
        fold.load(partition, [], from_start=True)
    batches = [group_by_partition(messages[i:i + batch_size]) for i in range(0, len(messages), batch_size)]
    for batch in batches[:WARM_UP_BATCHES]:
        fold.process(batch)
    timed = batches[WARM_UP_BATCHES:]
    profiler = cProfile.Profile() if profile else None
    t0 = time.perf_counter()
    if profiler:
        profiler.enable()
    for batch in timed:
        fold.process(batch)
    if profiler:
        profiler.disable()
    seconds = time.perf_counter() - t0
    if profiler:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
    events = sum(len(ms) for batch in timed for ms in batch.values())
    return {"partitions": partitions, "batch": batch_size, "batches": len(timed),
            "partitions_touched_mean": sum(len({p for _, p in b}) for b in timed) / len(timed),
            "ms_per_batch": 1000 * seconds / len(timed), "us_per_event": 1e6 * seconds / events}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--partitions", type=int, nargs="+", default=[4, 12])
    parser.add_argument("--batch", type=int, nargs="+", default=[100, 400, 4000])
    parser.add_argument("--events", type=int, default=120_000)
    parser.add_argument("--profile", action="store_true", help="cProfile the timed batches (slows them ~1.5x)")
    args = parser.parse_args()
    if min(args.partitions) < 1 or min(args.batch) < 1 or args.events < 1:
        parser.error("--partitions, --batch and --events must be positive")
    corpus = build_corpus(args.events)
    print(f"{'partitions':>10} {'batch':>6} {'touched':>8} {'ms/batch':>9} {'us/event':>9}")
    for partitions in args.partitions:
        for batch_size in args.batch:
            if len(corpus) < batch_size * (WARM_UP_BATCHES + 5):
                parser.error(f"--events {args.events} is too few for batches of {batch_size}")
            r = measure(corpus, partitions, batch_size, args.profile)
            print(f"{partitions:>10} {batch_size:>6} {r['partitions_touched_mean']:>8.1f} {r['ms_per_batch']:>9.2f} "
                  f"{r['us_per_event']:>9.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
