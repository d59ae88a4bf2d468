"""How close honest runs came to each monitor alarm: a table from their metrics.jsonl.

    python bench/monitor_calibration.py runs/demo/grpo runs/demo/ppo

For every signal with a default threshold: its min / max after ``monitor.warmup_steps``, and the
"patience-effective" extreme, the value the rule would have had to cross to fire: for a ``<`` rule
the smallest over every run of ``patience`` consecutive measured values of their largest, for a
``>`` rule the largest of their smallest (kl_start and eval_drop: 2 consecutive measurements).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lmpo.config import MonitorConfig  # noqa: E402
from lmpo.io.logging import read_metrics  # noqa: E402

M = MonitorConfig()
RULES = [  # signal, direction, default threshold, consecutive measurements needed
    ("distinct_frac", "<", M.min_distinct_frac, M.patience),
    ("entropy", "<", M.min_entropy, M.patience),
    ("kl_start", ">", M.max_kl_start, 2),
    ("length_ratio", ">", M.max_length_ratio, M.patience),
    ("truncated_frac", ">", M.max_truncated_frac, M.patience),
    ("eval_drop", ">", M.max_eval_drop, 2),
    ("reward_divergence", ">", M.max_reward_divergence, M.patience),
]


def extremes(values: list[float], direction: str, k: int) -> tuple[float, float, float]:
    runs = [values[i:i + k] for i in range(max(1, len(values) - k + 1))]
    eff = min(max(r) for r in runs) if direction == "<" else max(min(r) for r in runs)
    return min(values), max(values), eff


def main(argv=None):
    dirs = (argv if argv is not None else sys.argv[1:]) or ["runs/demo/grpo", "runs/demo/ppo"]
    head = "| signal | alarm (default) | " + " | ".join(f"{Path(d).name} min / max | {Path(d).name} patience-effective"
                                                   for d in dirs) + " |"
    lines = [head, "|" + "---|" * (2 + 2 * len(dirs))]
    rows = {d: [r for r in read_metrics(d) if r["step"] > M.warmup_steps] for d in dirs}
    for key, direction, thr, k in RULES:
        cells = []
        for d in dirs:
            vals = [r[f"monitor/{key}"] for r in rows[d] if r.get(f"monitor/{key}") is not None]
            if not vals:
                cells += ["—", "—"]
                continue
            lo, hi, eff = extremes(vals, direction, k)
            cells += [f"{lo:.3g} / {hi:.3g}", f"{eff:.3g}"]
        if all(c == "—" for c in cells):
            continue
        lines.append(f"| {key} | {direction} {thr} | " + " | ".join(cells) + " |")
    alarms = {d: (Path(d) / "alarms.jsonl").read_text().count("\n") if (Path(d) / "alarms.jsonl").exists() else 0
              for d in dirs}
    print("\n".join(lines))
    print("\nalarms: " + ", ".join(f"{Path(d).name} {n}" for d, n in alarms.items()))


if __name__ == "__main__":
    main()
