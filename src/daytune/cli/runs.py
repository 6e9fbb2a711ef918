"""`daytune runs list | show | compare | doctor`: the recorded runs."""

from __future__ import annotations

import sys


def add_parser(sub) -> None:
    sp = sub.add_parser(
        "runs",
        help="list, show, compare (HTML report) and diagnose recorded runs",
        description="Runs are folders under ./runs (or --runs-dir, or $DAYTUNE_RUNS); a run is named by its folder "
        "path or its id (the folder name, or any part of it that names one run).",
    )
    verbs = sp.add_subparsers(dest="runs_command", metavar="VERB", required=True)
    p = verbs.add_parser(
        "list", help="table: id, model, method, data fingerprint, time/budget, final loss, eval"
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p = verbs.add_parser("show", help="one run: config, environment, results, lineage, doctor")
    p.add_argument("run", help="run id or folder")
    p = verbs.add_parser(
        "compare", help="one self-contained HTML report: curves, throughput, memory, config diff, eval CIs"
    )
    p.add_argument("runs", nargs="+", metavar="RUN", help="run ids or folders (one or more)")
    p.add_argument("--out", required=True, help="the HTML file to write (e.g. report.html)")
    p = verbs.add_parser("doctor", help="the utilization doctor's findings and recommendations for a run")
    p.add_argument("run", help="run id or folder")
    for p in verbs.choices.values():
        p.add_argument("--runs-dir", help="where runs are (default: $DAYTUNE_RUNS or ./runs)")


def cmd_runs(args, reporter) -> int:
    from daytune.track.doctor import diagnose, findings_json, format_findings
    from daytune.track.runs import resolve_run, run_card, run_findings

    if args.runs_command == "list":
        return _list(args, reporter)
    if args.runs_command == "compare":
        from daytune.track.report import write_report

        runs = [resolve_run(r, args.runs_dir) for r in args.runs]
        out = write_report(runs, args.out)
        reporter.print(
            f"Report: {out} ({len(runs)} run{'s' if len(runs) > 1 else ''}; opens offline in any browser)"
        )
        return 0
    run = resolve_run(args.run, args.runs_dir)
    if args.runs_command == "doctor":
        from daytune.fileio import write_json_atomic

        findings = diagnose(run)
        if findings:
            write_json_atomic(run.path / "doctor.json", findings_json(findings))
        reporter.print(format_findings(findings), markup=False)
        return 0
    reporter.print(run_card(run))
    reporter.print(format_findings(run_findings(run)), markup=False)
    return 0


def _list(args, reporter) -> int:
    import json

    from daytune.track.runs import list_runs, run_facts, runs_root, runs_table, runs_text

    root = runs_root(args.runs_dir)
    facts = [run_facts(r) for r in list_runs(root)]
    if args.json:
        print(json.dumps(facts, indent=2))
    elif not facts:
        reporter.print(f"No runs under {root}.")
    elif not sys.stdout.isatty():  # piped: plain aligned columns, never cut to a terminal width
        print(runs_text(facts))
    else:
        reporter.print(runs_table(facts, root))
    return 0
