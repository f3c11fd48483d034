"""Copy a comparison written before the ratio rule existed, naming its rule explicitly.

Runs of masked methods then used the paper's softmax rule (the only one), so ``amss`` becomes
``amss@softmax`` and its config gets ``rule="softmax"``; joint, OGM-GE and the rest are unchanged.
Only the methods given (default: joint, ogm-ge, uniform, amss, amss+) are kept.

    python benchmarks/relabel_softmax_runs.py OLD.json NEW.json [--methods joint,ogm-ge,...]
"""

import argparse
import json

from masked_optim.experiments.compare import save_json, summarise, validate_result
from masked_optim.experiments.training import method_rule, method_spec, parse_method


def relabel(comparison: dict, keep: list[str]) -> dict:
    runs = []
    for run in comparison["runs"]:
        method = run["config"]["method"]
        if method not in keep:
            continue
        if method_rule(method) is None and method_spec(parse_method(method)[0]).mask != "none":
            run = dict(run, config=dict(run["config"], method=method + "@softmax", rule="softmax"))
        runs.append(run)
    methods = list(dict.fromkeys(r["config"]["method"] for r in runs))
    out = dict(comparison, runs=runs, methods=methods, relabelled_from=comparison.get("created"))
    out["summary"] = summarise(out)
    validate_result(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old")
    parser.add_argument("new")
    parser.add_argument("--methods", default="joint,ogm-ge,uniform,amss,amss+")
    args = parser.parse_args()
    with open(args.old) as f:
        comparison = json.load(f)
    save_json(relabel(comparison, args.methods.split(",")), args.new)
    print(f"wrote {args.new}")


if __name__ == "__main__":
    main()
