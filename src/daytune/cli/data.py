"""`daytune data sources | prepare | inspect`: the sources daytune knows, building a dataset, looking at one."""

from __future__ import annotations


def add_parser(sub) -> None:
    sp = sub.add_parser("data", help="data sources, mixing recipes, cleaning and data cards")
    data = sp.add_subparsers(dest="data_command", metavar="DATA_COMMAND", required=True)
    dp = data.add_parser("sources", help="the sources daytune knows, with licence and provenance")
    dp.add_argument("--json", action="store_true", help="print JSON instead of a table")
    dp = data.add_parser(
        "prepare",
        help="load, filter, deduplicate and decontaminate a data recipe into a dataset folder with its card",
    )
    dp.add_argument("recipe", help="data recipe YAML (see examples/data-mix.yaml)")
    dp.add_argument("--out", required=True, help="the folder to write (train.jsonl, val.jsonl, data_card.*)")
    dp.add_argument("--force", action="store_true", help="replace --out if it exists (swapped in atomically)")
    dp.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe field (repeatable)"
    )
    dp = data.add_parser(
        "inspect", help="print a dataset's card and sample rows as the model sees them, loss mask visible"
    )
    dp.add_argument("folder", help="a folder written by `daytune data prepare`")
    dp.add_argument("-n", "--samples", type=int, default=3, help="how many training rows to show (default 3)")
    dp.add_argument("--source", help="show rows of this source only")
    dp.add_argument("--seed", type=int, default=0, help="which rows to sample")
    dp.add_argument("--model", help="render with this model's tokenizer (default: the one in the card)")
    dp.add_argument("--template", choices=["chat", "alpaca"], help="default: the card's template")
    dp.add_argument("--no-card", action="store_true", help="samples only")


def cmd_data(args, reporter) -> int:
    if args.data_command == "sources":
        return _sources(args, reporter)
    if args.data_command == "prepare":
        return _prepare(args, reporter)
    from daytune.data.show import inspect_dataset

    inspect_dataset(
        args.folder,
        reporter,
        n=args.samples,
        source=args.source,
        seed=args.seed,
        model=args.model,
        template=args.template,
        show_card=not args.no_card,
    )
    return 0


def _sources(args, reporter) -> int:
    import json
    from dataclasses import asdict

    from daytune.data.sources import SOURCES

    if args.json:
        print(json.dumps({name: asdict(src) for name, src in SOURCES.items()}, indent=2))
        return 0
    for src in SOURCES.values():
        p = src.provenance
        reporter.print(
            f"[bold]{src.name}[/bold]  {p.licence} · commercial use: {'yes' if p.commercial else 'no'} · "
            f"written by: {'LLM' if p.llm_generated else 'people'} · format: {src.format} · "
            f"hub: {src.hub_id or '-'}"
        )
        reporter.print(f"    {src.title}\n    cite: {p.citation}\n    {src.notes}".rstrip())
    reporter.print("\nYour own files: give format: and declare provenance: (see examples/data-mix.yaml).")
    return 0


def _prepare(args, reporter) -> int:
    from daytune.data.prepare import prepare
    from daytune.data.recipe import load_data_recipe

    recipe = load_data_recipe(args.recipe, args.set)
    card = prepare(recipe, args.out, reporter=reporter, force=args.force, recipe_file=str(args.recipe))
    for w in card["warnings"]:
        reporter.print(f"warning: {w}")
    removed = sum(r["count"] for r in card["removed"])
    reporter.print(
        f"{card['files']['train.jsonl']['rows']} training and {card['files']['val.jsonl']['rows']} validation "
        f"rows in {args.out} ({removed} rows removed, see data_card.md); fingerprint {card['fingerprint']}"
    )
    reporter.print(f"Inspect it: daytune data inspect {args.out}")
    return 0
