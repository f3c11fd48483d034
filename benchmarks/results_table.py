"""Print the results tables of docs/results.md (GitHub markdown) from compare JSONs.

    python benchmarks/results_table.py benchmarks/results/compare/*.json
"""

import json
import sys

from masked_optim.compare import format_table, summarise, validate_result


def main(paths: list[str]) -> None:
    for path in paths:
        with open(path) as fh:
            comparison = json.load(fh)
        validate_result(comparison)
        comparison["summary"] = summarise(comparison)  # recomputed from the runs, as the library does now
        env = comparison["environment"]
        runs = comparison["runs"]
        diverged = sorted({r["config"]["method"] for r in runs if r.get("diverged_at_epoch") is not None})
        print(f"### {comparison['dataset_name']}\n")
        print(format_table(comparison, markdown=True, compact=len(comparison["modalities"]) > 2))
        print(f"\n{len(comparison['seeds'])} seeds" + (f" x {len(comparison['folds'])} folds" if len(comparison["folds"]) > 1 else "")
              + f"; created {comparison['created']}; torch {env['torch']}, {env['processor']}"
              + (f"; diverged runs: {', '.join(diverged)}" if diverged else "") + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
