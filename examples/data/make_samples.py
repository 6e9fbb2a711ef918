"""Regenerate the demo samples in this folder from the original files.

    python examples/data/make_samples.py --source PATH/TO/datasets

`--source` holds gsm8k/{train,test}.jsonl (openai/grade-school-math) and mmlu/test/*.csv (hendrycks/test, CSV with a
header question,choice0..choice3,answer). The samples are deterministic (fixed seed), so rerunning gives the same files.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
CALC = re.compile(r"<<[^>]*>>")


def gsm8k(rows_in: Path, out: Path, n: int, seed: int) -> None:
    rows = [json.loads(line) for line in rows_in.read_text(encoding="utf-8").splitlines() if line.strip()]
    random.Random(seed).shuffle(rows)
    with open(out, "w", encoding="utf-8") as f:
        for r in rows[:n]:
            # calculator annotations (<<48/2=24>>) are a dataset artifact, not text a model should learn to write
            f.write(json.dumps({"instruction": r["question"], "output": CALC.sub("", r["answer"])}) + "\n")


def mmlu(test_dir: Path, out: Path, per_subject: int, seed: int) -> None:
    rng = random.Random(seed)
    with open(out, "w", encoding="utf-8") as f:
        for path in sorted(test_dir.glob("*_test.csv")):
            subject = path.name[: -len("_test.csv")]
            rows = list(csv.DictReader(open(path, encoding="utf-8")))
            for r in rng.sample(rows, min(per_subject, len(rows))):
                choices = [r[f"choice{i}"] for i in range(4)]
                f.write(
                    json.dumps(
                        {
                            "subject": subject,
                            "question": r["question"],
                            "choices": choices,
                            "answer": int(r["answer"]),
                        }
                    )
                    + "\n"
                )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", required=True, type=Path)
    args = ap.parse_args()
    gsm8k(args.source / "gsm8k" / "train.jsonl", HERE / "gsm8k_train.jsonl", 400, seed=1)
    gsm8k(args.source / "gsm8k" / "test.jsonl", HERE / "gsm8k_test.jsonl", 100, seed=2)
    mmlu(args.source / "mmlu" / "test", HERE / "mmlu_test.jsonl", 2, seed=3)


if __name__ == "__main__":
    main()
