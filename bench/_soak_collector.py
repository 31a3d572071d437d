"""``python bench/_soak_collector.py --store log|sqlite --config FILE``: the collector, with its persistent
queue on the store named (bench/soak.py compares them). ``log`` is what the collector uses."""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]


def main() -> int:
    args = sys.argv[1:]
    store = "log"
    if args[:1] == ["--store"]:
        store, args = args[1], args[2:]
    if store == "sqlite":
        from _sqlite_queue import SQLiteQueue

        from prism_otel.collector.pipeline import Pipeline

        Pipeline.store_class = SQLiteQueue
    from prism_otel.collector.cli import main as collector_main

    return collector_main(args)


if __name__ == "__main__":
    sys.exit(main())
