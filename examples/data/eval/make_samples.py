"""Rebuild the evaluation samples in this folder from the full datasets (deterministic: the first rows of each file).

    python examples/data/eval/make_samples.py /path/to/datasets   # the folder whose SOURCES.md describes them

The layout mirrors the datasets folder, so the same loaders read either one (`--data-root`).
"""

import csv
import json
import shutil
import sys
from pathlib import Path

MMLU_SUBJECTS = [
    "abstract_algebra",
    "college_chemistry",
    "computer_security",
    "econometrics",
    "us_foreign_policy",
]
BBQ = ["Age", "Disability_status", "Nationality", "Physical_appearance", "Religion", "Sexual_orientation"]


def head_lines(src: Path, dst: Path, n: int) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    with open(src, "rb") as f:
        lines = f.read().splitlines(keepends=True)
    dst.write_bytes(b"".join(lines[:n]))


def head_csv(src: Path, dst: Path, n: int) -> None:
    """The header and the first n records (a record may span lines inside quotes)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    with open(src, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))[: n + 1]
    with open(dst, "w", encoding="utf-8", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows(rows)


def main(root: Path, out: Path) -> None:
    for s in MMLU_SUBJECTS:
        head_csv(root / f"mmlu/dev/{s}_dev.csv", out / f"mmlu/dev/{s}_dev.csv", 5)
        head_csv(root / f"mmlu/test/{s}_test.csv", out / f"mmlu/test/{s}_test.csv", 20)
    items = json.loads((root / "truthfulqa/mc_task.json").read_text(encoding="utf-8"))[:60]
    (out / "truthfulqa").mkdir(parents=True, exist_ok=True)
    (out / "truthfulqa/mc_task.json").write_text(
        json.dumps(items, indent=2, ensure_ascii=False) + "\n", "utf-8"
    )
    for c in BBQ:
        head_lines(root / f"bbq/{c}.jsonl", out / f"bbq/{c}.jsonl", 12)
    head_lines(root / "gsm8k/train.jsonl", out / "gsm8k/train.jsonl", 5)
    head_lines(root / "gsm8k/test.jsonl", out / "gsm8k/test.jsonl", 30)
    head_lines(root / "openbookqa/test.jsonl", out / "openbookqa/test.jsonl", 50)
    # the first three articles shorter than 6,000 bytes, whole (an article starts at a ' = Title = ' line)
    raw = (root / "wikitext2/wiki.test.raw").read_bytes().splitlines(keepends=True)
    starts = [i for i, line in enumerate(raw) if line.startswith(b" = ") and not line.startswith(b" = = ")]
    articles = [raw[a:b] for a, b in zip(starts, starts[1:] + [len(raw)])]
    short = [a for a in articles if sum(map(len, a)) < 6_000][:3]
    (out / "wikitext2").mkdir(parents=True, exist_ok=True)
    (out / "wikitext2/wiki.test.raw").write_bytes(b"".join(line for a in short for line in a))
    for d in ("mmlu", "truthfulqa", "bbq", "gsm8k", "openbookqa"):
        shutil.copyfile(root / d / "LICENSE.upstream", out / d / "LICENSE.upstream")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(__file__).resolve().parent)
