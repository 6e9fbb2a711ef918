"""Decontamination and near-duplicate removal at 100k rows: daytune vs the straightforward implementations.

    python benchmarks/data_prepare.py [--datasets DIR] [--rows 100000] [--naive-dedup-rows 10000]
                                      [--out benchmarks/results/data_prepare.json]

Training rows: every real row of Super-NaturalInstructions (42 tasks), GSM8K train and LIMA from the datasets folder
(--datasets, default $DAYTUNE_SHARED_DATA or ../shared/data beside the repository), topped up to --rows with
perturbed copies (a tenth of the words dropped: near duplicates), and 200 rows that embed an evaluation item
verbatim (planted contamination). Evaluation items: every item of the evaluation sets daytune knows in that folder.

  decontaminate  daytune: numpy n-gram hashes + binary search (13-grams, plus whole items of 8-12 words)
                 naive:   Python sets of 13-word tuples, row by row (the usual script); both on all rows
  near dedup     daytune: MinHash signatures for all rows at once (numpy, datasketch's scheme) + datasketch LSH
                 naive:   datasketch's textbook loop (MinHash.update per shingle) + the same LSH; on a subset,
                          because it is slow; daytune runs on the same subset too, and the answers are compared
The memory each decontamination index adds (resident set growth while it is built) is reported too.

Prints a table and writes JSON. Ratios matter, not absolute numbers: machines are noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from daytune.data import loaders  # noqa: E402
from daytune.data.decontam import EvalIndex, naive_contaminated, naive_index  # noqa: E402
from daytune.data.dedup import exact_duplicates, naive_near_duplicates, near_duplicates  # noqa: E402
from daytune.data.evalsets import EVAL_SETS, find_files, read_eval_set  # noqa: E402
from daytune.data.files import ErrorPolicy  # noqa: E402
from daytune.data.prepare import near_text  # noqa: E402
from daytune.data.records import record_text  # noqa: E402


def rss_mb() -> float:
    """Resident memory now (Linux), to compare what each index holds."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def training_rows(
    datasets: Path, n: int, eval_items: list[tuple[str, str]], seed: int = 0
) -> tuple[list[dict], set]:
    rows = []
    for fmt, path in (
        ("sni", datasets / "natural_instructions"),
        ("gsm8k", datasets / "gsm8k" / "train.jsonl"),
        ("lima", datasets / "lima" / "lima.json"),
    ):
        files = loaders.data_files(fmt, path, None)
        rows += loaders.load(fmt, files, fmt, loaders.LoadOptions(), ErrorPolicy()).records
    rng = random.Random(seed)
    real = list(rows)
    rng.shuffle(real)
    out = []
    for k in range(200):  # contamination: an evaluation item copied into a training row
        _, text = eval_items[rng.randrange(len(eval_items))]
        base = {k2: v for k2, v in real[rng.randrange(len(real))].items() if k2 != "messages"}
        base.update(id=f"planted-{k}", output=f"{base.get('output', '')}\n{text}")
        out.append(base)
    out += real[: max(0, n - len(out))]
    i = 0
    while len(out) < n:  # near duplicates: a real row with a tenth of its output's words dropped
        base = {k2: v for k2, v in real[rng.randrange(len(real))].items() if k2 != "messages"}
        words = base.get("output", "").split()
        base["output"] = " ".join(w for w in words if rng.random() > 0.1) or base.get("output", "")
        base["id"] = f"copy-{i}"
        out.append(base)
        i += 1
    rng.shuffle(out)
    planted = {i for i, r in enumerate(out) if r["id"].startswith("planted-")}
    return out, planted


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default = Path(os.environ.get("DAYTUNE_SHARED_DATA", ROOT.parent / "shared" / "data"))
    ap.add_argument("--datasets", type=Path, default=default)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--naive-dedup-rows", type=int, default=10_000)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "data_prepare.json")
    args = ap.parse_args()
    if not args.datasets.is_dir():
        sys.exit(f"datasets folder not found: {args.datasets} (pass --datasets or set DAYTUNE_SHARED_DATA)")

    eval_items = []
    for name, es in EVAL_SETS.items():
        eval_items += read_eval_set(name, find_files(args.datasets, es))
    rows, planted = training_rows(args.datasets, args.rows, eval_items)
    texts = [record_text(r) for r in rows]
    n_words = sum(len(t.split()) for t in texts)
    print(f"{len(rows)} training rows ({n_words / 1e6:.1f}M words), {len(eval_items)} evaluation items")
    results = []

    def record(task, impl, rows_, seconds, **extra):
        results.append(
            {
                "task": task,
                "impl": impl,
                "rows": rows_,
                "seconds": round(seconds, 2),
                "rows_per_s": round(rows_ / seconds, 1),
                **extra,
            }
        )

    # ---- decontamination --------------------------------------------------------------------------------
    rss0 = rss_mb()
    t0 = time.perf_counter()
    index = EvalIndex(n=13, min_ngram=8)
    for name in EVAL_SETS:
        index.add(name, [(ref, text) for ref, text in eval_items if ref.startswith(name + "/")])
    index.build()
    t_index = time.perf_counter() - t0
    index_mb = rss_mb() - rss0
    t1 = time.perf_counter()
    matches = index.check(texts)
    t_check = time.perf_counter() - t1
    fast_rows = {m.row for m in matches}
    record(
        "decontaminate",
        "daytune",
        len(rows),
        t_index + t_check,
        index_seconds=round(t_index, 2),
        index_mb=round(index_mb),
        flagged=len(fast_rows),
        planted_found=len(planted & fast_rows),
        planted=len(planted),
    )
    strict = EvalIndex(n=13, min_ngram=13)  # 13-grams only: the same rule as the naive code
    strict.add("all", eval_items)
    strict_rows = {m.row for m in strict.check(texts)}
    rss0 = rss_mb()
    t0 = time.perf_counter()
    naive = naive_index([t for _, t in eval_items], n=13)
    t_naive_index = time.perf_counter() - t0
    naive_mb = rss_mb() - rss0
    naive_rows = set(naive_contaminated(texts, naive, n=13))
    del naive
    record(
        "decontaminate",
        "naive (Python sets)",
        len(rows),
        time.perf_counter() - t0,
        index_seconds=round(t_naive_index, 2),
        index_mb=round(naive_mb),
        flagged=len(naive_rows),
        same_rows_as_daytune_13gram_only=naive_rows == strict_rows,
    )

    # ---- near duplicates --------------------------------------------------------------------------------
    near_texts = [near_text(r) for r in rows]
    t0 = time.perf_counter()
    exact = exact_duplicates(texts)
    record("exact dedup", "daytune", len(rows), time.perf_counter() - t0, duplicates=len(exact))
    t0 = time.perf_counter()
    near = near_duplicates(near_texts, threshold=0.8)
    record("near dedup", "daytune", len(rows), time.perf_counter() - t0, duplicates=len(near))
    sub = near_texts[: args.naive_dedup_rows]
    t0 = time.perf_counter()
    fast_sub = set(near_duplicates(sub, threshold=0.8))
    record("near dedup (subset)", "daytune", len(sub), time.perf_counter() - t0, duplicates=len(fast_sub))
    t0 = time.perf_counter()
    naive_sub = set(naive_near_duplicates(sub, threshold=0.8))
    both = len(fast_sub & naive_sub) / max(1, len(fast_sub | naive_sub))
    record(
        "near dedup (subset)",
        "naive (datasketch loop)",
        len(sub),
        time.perf_counter() - t0,
        duplicates=len(naive_sub),
        agreement_jaccard=round(both, 3),
    )

    speed = {r["task"] + "/" + r["impl"]: r["rows_per_s"] for r in results}
    ratios = {
        "decontaminate": round(
            speed["decontaminate/daytune"] / speed["decontaminate/naive (Python sets)"], 1
        ),
        "near dedup": round(
            speed["near dedup (subset)/daytune"] / speed["near dedup (subset)/naive (datasketch loop)"], 1
        ),
    }
    print(f"\n{'task':22s} {'impl':26s} {'rows':>7s} {'seconds':>8s} {'rows/s':>9s}  notes")
    for r in results:
        notes = {k: v for k, v in r.items() if k not in ("task", "impl", "rows", "seconds", "rows_per_s")}
        print(
            f"{r['task']:22s} {r['impl']:26s} {r['rows']:7d} {r['seconds']:8.2f} {r['rows_per_s']:9.0f}  {notes}"
        )
    print(f"\nspeed-up (rows/s, daytune / naive): {ratios}")
    out = {
        "benchmark": "data_prepare",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "settings": {
            "rows": len(rows),
            "words": n_words,
            "eval_items": len(eval_items),
            "ngram": 13,
            "min_ngram": 8,
            "minhash": {"num_perm": 128, "shingle_words": 3, "threshold": 0.8},
            "naive_dedup_rows": len(sub),
        },
        "rows": results,
        "speedup": ratios,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
