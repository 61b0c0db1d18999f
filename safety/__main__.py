"""Command line: ``python -m safety eval [--data PATH ...] [--rules PATH]``, ``check TEXT``,
``flag-rate JSONL [--field query]`` (how many unlabelled complaints are flagged, by rules and by the backstop
alone), ``train-backstop``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from safety.evaluate import EVAL_SETS, EvalSet, Report, evaluate, format_report, load_cases
from safety.triage import Triage


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m safety", description="Clinical red-flag triage tools.")
    sub = parser.add_subparsers(dest="command", required=True)
    ev = sub.add_parser("eval", help="recall / false-alarm rate of the rules on labelled sets")
    ev.add_argument(
        "--data",
        type=Path,
        action="append",
        help="JSONL set (repeatable); default: every packaged set, tuned and blind",
    )
    ev.add_argument("--rules", type=Path, default=None, help="rule file (default: packaged red_flags.json)")
    check = sub.add_parser("check", help="assess one complaint and print the result")
    check.add_argument("text")
    check.add_argument("--rules", type=Path, default=None)
    rate = sub.add_parser("flag-rate", help="how many complaints of an unlabelled JSONL file are flagged")
    rate.add_argument("data", type=Path, help="JSONL, one complaint a line (e.g. ../shared/data/eval/dxy_dev.jsonl)")
    rate.add_argument("--field", default="query", help="the field that holds the complaint (default: query)")
    rate.add_argument("--rules", type=Path, default=None)
    sub.add_parser("train-backstop", help="train the learned backstop on the tuned sets (writes its weights file)")
    args = parser.parse_args(argv)

    if args.command == "train-backstop":
        from safety.train_backstop import train

        train()
        return 0

    try:
        triage = Triage.from_file(args.rules)
        rules_only = Triage.from_file(args.rules, backstop=False)
        combined = Triage.from_file(args.rules, backstop=True) if args.command == "eval" else triage
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    if args.command == "flag-rate":
        return _flag_rate(triage, args.data, args.field)

    if args.command == "check":
        a = triage.assess(args.text)
        print(a.to_dict())
        if a.prompt_note:
            print(a.prompt_note)
        return 0

    print(f"rules version {triage.version}: {len(triage.rule_ids)} rules")
    bs = combined.backstop
    assert bs is not None
    state = "ENABLED" if triage.backstop is not None else "disabled"
    print(
        f"learned backstop {bs.version}, threshold {bs.threshold:.3f}, minimum evidence {bs.min_evidence} content "
        f"words (or a severity/onset cue), rule id 'backstop': {state}"
    )
    print("per-set details: the serving configuration; summary: rules only | rules+backstop")
    sets = [EvalSet(p, "custom") for p in args.data] if args.data else [s for s in EVAL_SETS if s.path.is_file()]
    summary: list[str] = []
    for es in sets:
        try:
            cases = load_cases(es.path)
        except (OSError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        label = f"[{es.kind.upper()}] {es.path.name}"
        report = evaluate(triage, cases, name=label + (f" ({es.note})" if es.note else ""))
        print()
        print(format_report(report, triage.rule_ids))
        base, both = evaluate(rules_only, cases), evaluate(combined, cases)
        summary.append(f"  {label:<30} {_cell(base)} | {_cell(both)}")
    print()
    print(f"summary: {'':<24} {'rules only':<50} | rules+backstop")
    print("\n".join(summary))
    return 0


def _flag_rate(triage: Triage, path: Path, field: str) -> int:
    try:
        texts = [str(json.loads(line)[field]) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, ValueError, KeyError, TypeError) as exc:  # TypeError: a line that is not an object
        print(f"error: cannot read complaints ({field!r}) from {path}: {exc}", file=sys.stderr)
        return 2
    flagged = [triage.assess(t).rule_ids for t in texts]
    by_rules = sum(1 for ids in flagged if ids and ids != ["backstop"])
    by_backstop = sum(1 for ids in flagged if ids == ["backstop"])
    total = by_rules + by_backstop
    backstop = triage.backstop.version if triage.backstop else "off"
    print(f"{path.name}: {total} of {len(texts)} flagged ({total / max(len(texts), 1):.1%}): by the rules {by_rules}, "
          f"by the backstop alone {by_backstop} (rules {triage.version}, backstop {backstop})")
    return 0


def _cell(r: Report) -> str:
    return (
        f"recall {r.recall:6.1%} ({r.true_pos}/{r.positives}) "
        f"false alarms {r.false_alarm_rate:6.1%} ({r.false_pos}/{r.negatives})"
    )


if __name__ == "__main__":
    sys.exit(main())
