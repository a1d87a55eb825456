"""The CUDA_PREFERENCE (ddpm_fast/ops/backend.py) that a GPU op record supports, and the Triton issue's
"within 1.15x of the CUDA kernel" per op.

    python benchmarks/preference.py [RECORD]    (default: the newest benchmarks/results/ops-cuda-*.json)

Per op, over its benchmark cases timed on both backends: the geometric mean of triton's median time over
cuda's decides the order (below 1: triton first), and the worst case's ratio is the one the 1.15x target
is about. Prints the table to paste into backend.py, with the evidence beside it.
"""

from __future__ import annotations

import glob
import json
import math
import os
import sys

# The start of a benchmark case's op name -> the op's entry in CUDA_PREFERENCE. A thresholded step's case
# ("DDPM step (eps, thresholding)") counts for the entry of its own: its select kernels decide its time.
OPS = {"q_sample": "q_sample", "DDPM step": "step", "DDIM step": "step", "group_norm_silu": "group_norm_silu"}
TRITON_WITHIN = 1.15


def _entry(case_op: str) -> str | None:
    """The CUDA_PREFERENCE entry a benchmark case is evidence for, or None."""
    op = next((name for prefix, name in OPS.items() if case_op.startswith(prefix)), None)
    return "step_thresholding" if op == "step" and "thresholding" in case_op else op


def preference(rows: list[dict]) -> dict[str, dict]:
    """{op: {"order", "geomean", "worst", "worst_case", "cases"}} from a record's rows; ops with no case timed
    on both backends are left out."""
    ratios: dict[str, list[tuple[float, str]]] = {}
    for row in rows:
        op = _entry(row["op"])
        if op is None or "cuda_ms" not in row or "triton_ms" not in row:
            continue
        case = f"{row['op']} {tuple(row['shape'])} {row['dtype'].replace('torch.', '')} {row['layout']}"
        ratios.setdefault(op, []).append((row["triton_ms"]["median"] / row["cuda_ms"]["median"], case))
    result = {}
    for op, values in ratios.items():
        geomean = math.exp(sum(math.log(r) for r, _ in values) / len(values))
        worst, worst_case = max(values)
        result[op] = {"order": ("triton", "cuda") if geomean < 1 else ("cuda", "triton"), "geomean": geomean,
                      "worst": worst, "worst_case": worst_case, "cases": len(values)}
    return result


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    records = argv or sorted(glob.glob(os.path.join(os.path.dirname(__file__), "results", "ops-cuda-*.json")))
    if not records:
        print("no GPU op record (benchmarks/results/ops-cuda-*.json): run table.py --device cuda --record")
        return 1
    path = records[-1]
    with open(path) as f:
        prefs = preference(json.load(f)["rows"])
    print(f"{path}: triton time / cuda time per op (geometric mean; worst case, against {TRITON_WITHIN}x)")
    for op, p in prefs.items():
        verdict = "ok" if p["worst"] <= TRITON_WITHIN else "OVER"
        print(f"  {op:16} {p['geomean']:.2f} over {p['cases']} cases; worst {p['worst']:.2f} {verdict} "
              f"({p['worst_case']})")
    print("CUDA_PREFERENCE = {" + ", ".join(f'"{op}": {p["order"]}' for op, p in prefs.items()) + "}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
