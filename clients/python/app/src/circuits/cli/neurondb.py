"""`circuits neurondb`: stand up and query a PostgreSQL neuron-description database.

    circuits neurondb import descriptions.jsonl --create     # create the table, upsert descriptions
    circuits neurondb query 24:5326 3:17                     # print descriptions of neurons

Connection: --host/--port/--user/--database flags, else PG_HOST, PG_PORT, PG_USER, PG_PASSWORD,
PG_DATABASE (the password is only read from PG_PASSWORD, never from a flag).
"""

from __future__ import annotations

import argparse
import json
import time

from circuits_core.errors import InvalidArgument


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=("import", "query"), help="import a JSONL file or query neurons")
    parser.add_argument("items", nargs="+", help="import: JSONL/JSON file; query: LAYER:NEURON ...")
    parser.add_argument("--create", action="store_true", help="create the table if it does not exist")
    parser.add_argument("--host", default="")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--user", default="")
    parser.add_argument("--database", default="")
    parser.add_argument("--table", default="neuron_descriptions")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def _unit(text: str) -> tuple[int, int]:
    try:
        layer, neuron = text.split(":")
        return int(layer), int(neuron)
    except ValueError:
        raise InvalidArgument(f"neuron {text!r} must look like LAYER:NEURON, e.g. 24:5326") from None


def run(args: argparse.Namespace) -> int:
    from circuits_core.config import LabelingSection
    from circuits_core.labels import NeuronDB, PgSettings, iter_label_file

    section = LabelingSection(
        method="neurondb", pg_host=args.host, pg_port=args.port, pg_user=args.user,
        pg_database=args.database, pg_table=args.table,
    )
    with NeuronDB(PgSettings.from_config(section)) as db:
        if args.action == "import":
            if args.create:
                db.create_table()
            total = 0
            started = time.perf_counter()
            for path in args.items:
                total += db.import_records(iter_label_file(path, default_source="neurondb"))
            print(f"imported {total:,} descriptions into {args.table} in {time.perf_counter() - started:.2f}s")
            return 0
        units = [_unit(item) for item in args.items]
        found = db.fetch(units)
        if args.json:
            print(json.dumps({f"L{k[0]}/N{k[1]}": [r.to_json() for r in v] for k, v in sorted(found.items())}))
            return 0
        for key in units:
            records = found.get(key)
            if not records:
                print(f"L{key[0]}/N{key[1]}\t(no description)")
            for r in records or ():
                sign = {1: "+", -1: "-", 0: " "}[r.polarity]
                print(f"L{key[0]}/N{key[1]}\t{sign}\t{r.description}")
    return 0
