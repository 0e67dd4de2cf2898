"""The `gradus` command line."""

from __future__ import annotations

import argparse
import sys

from gradus.objectives import PRESETS, resolve_objective


def _algos_table() -> str:
    """Each preset's settings side by side, one row per knob."""
    rows: dict[str, dict[str, str]] = {}
    for name in PRESETS:
        obj = resolve_objective(name)
        fields = {"ratio": obj.ratio, "trust region": obj.trust, **{k: str(v) for k, v in obj.knobs().items()}}
        for key, value in fields.items():
            rows.setdefault(key, {})[name] = value
    header = "| knob | " + " | ".join(PRESETS) + " |"
    lines = [header, "|" + " --- |" * (len(PRESETS) + 1)]
    for key, by_algo in rows.items():
        lines.append(f"| {key} | " + " | ".join(by_algo.get(a, "-") for a in PRESETS) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gradus", description="RL post-training of language models.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("algos", help="print every algorithm preset's settings side by side")
    demo = sub.add_parser("demo", help="train a toy policy with each objective (no model needed)")
    demo.add_argument("--algos", default=",".join(PRESETS), help="comma-separated presets")
    demo.add_argument("--steps", type=int, default=30)
    args = parser.parse_args(argv)

    if args.command == "algos":
        print(_algos_table())
    elif args.command == "demo":
        from gradus.demo import main as demo_main

        algos = [a.strip() for a in args.algos.split(",") if a.strip()]
        for a in algos:
            resolve_objective(a)  # fail fast on a typo, listing the valid names
        demo_main(algos, args.steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
