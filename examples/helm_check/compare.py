"""Compare a HELM run (helm-run against `daytune serve`) with daytune on the same MMLU instances.

    python examples/helm_check/compare.py BENCHMARK_OUTPUT/runs/SUITE/mmlu:subject=...  [--data-root DIR]

Reads HELM's scenario_state.json and stats.json, then (1) sends HELM's exact prompts through daytune's local
backend and checks that the outputs equal what HELM received from the server, and (2) runs daytune's own MMLU
scenario on the same test questions and prints both exact-match scores. See docs/eval.md ("HELM's own code").
"""

import argparse
import json
from pathlib import Path

from daytune.eval.lm import GenerateRequest, LocalLM
from daytune.eval.scenarios import SCENARIOS, DataRoot, Settings, default_data_root


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data-root", default=None)
    args = ap.parse_args()
    run = Path(args.run_dir)
    state = json.loads((run / "scenario_state.json").read_text())
    stats = json.loads((run / "stats.json").read_text())
    helm_em = next(
        s["mean"]
        for s in stats
        if s["name"]["name"] == "exact_match"
        and s["name"]["split"] == "test"
        and "perturbation" not in s["name"]
    )
    states = [s for s in state["request_states"] if s["instance"]["split"] == "test"]
    subject = state["adapter_spec"]["instructions"].split("about ")[-1].strip(" .\n").replace(" ", "_")
    lm = LocalLM.load(args.model, log=lambda *a: None)
    req = states[0]["request"]
    gens = lm.generate(
        [GenerateRequest(s["request"]["prompt"], req["max_tokens"], req["stop_sequences"]) for s in states]
    )
    same = sum(g.text == s["result"]["completions"][0]["text"] for g, s in zip(gens, states))
    scen = SCENARIOS["mmlu"]()
    root = DataRoot(Path(args.data_root) if args.data_root else default_data_root())
    wanted = {s["instance"]["input"]["text"] for s in states}
    insts = [i for i in scen.load(root, Settings(subjects=[subject])) if i.input in wanted]
    records, _ = scen.run(lm, insts, Settings())
    ours = sum(r["exact_match"] for r in records) / len(records)
    print(f"HELM prompts through daytune's local backend: {same}/{len(states)} outputs equal to the server's")
    print(f"HELM exact_match (helm-run -> daytune serve): {helm_em:.3f} on {len(states)} instances")
    print(f"daytune exact_match (its MMLU scenario, same questions): {ours:.3f} on {len(records)} instances")
    for s in states[:3]:
        print(
            "HELM prompt tail:",
            repr(s["request"]["prompt"][-120:]),
            "->",
            repr(s["result"]["completions"][0]["text"]),
        )


if __name__ == "__main__":
    main()
