"""Command line: ``python -m safety eval [--data PATH ...] [--rules PATH]``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from safety.evaluate import DEFAULT_SETS, evaluate, format_report, load_cases
from safety.triage import Triage


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m safety", description="Clinical red-flag triage tools.")
    sub = parser.add_subparsers(dest="command", required=True)
    ev = sub.add_parser("eval", help="recall / false-alarm rate of the rules on labelled sets")
    ev.add_argument("--data", type=Path, action="append", help="JSONL set (repeatable); default: eval + holdout")
    ev.add_argument("--rules", type=Path, default=None, help="rule file (default: packaged red_flags.json)")
    check = sub.add_parser("check", help="assess one complaint and print the result")
    check.add_argument("text")
    check.add_argument("--rules", type=Path, default=None)
    args = parser.parse_args(argv)

    try:
        triage = Triage.from_file(args.rules)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    if args.command == "check":
        a = triage.assess(args.text)
        print(a.to_dict())
        if a.prompt_note:
            print(a.prompt_note)
        return 0

    print(f"rules version {triage.version}: {len(triage.rule_ids)} rules")
    for path in args.data or [p for p in DEFAULT_SETS if p.is_file()]:
        try:
            cases = load_cases(path)
        except (OSError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print()
        print(format_report(evaluate(triage, cases, name=path.name), triage.rule_ids))
    return 0


if __name__ == "__main__":
    sys.exit(main())
