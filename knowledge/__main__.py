"""CLI: python -m knowledge build|search|dialogues|eval|import (run with --help for each)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

DEFAULT_CACHE = Path(".cache/knowledge")


class UsageError(Exception):
    """A command line that cannot be run as asked: printed as an error, exit code 2 (as argparse's)."""


def _dialogue_folder(value: str, option: str) -> Path:
    from knowledge.dialogue_view import dialogue_files

    folder = Path(value)
    if not folder.is_dir():
        raise UsageError(f"{option} {value}: no such folder")
    if not dialogue_files(folder):
        raise UsageError(f"{option} {value}: no dialogue files (*.jsonl) in it")
    return folder


def _dialogues(args: argparse.Namespace) -> Path | bool:
    """--dialogues: 'auto' (a dialogues/ folder beside the library), 'none', or a folder."""
    value = getattr(args, "dialogues", "auto")
    return True if value == "auto" else False if value == "none" else _dialogue_folder(value, "--dialogues")


def _retriever(args: argparse.Namespace, progress: bool = True, dialogues: Path | bool | None = None,
               rebuild_view: bool = False):
    from knowledge.search import Retriever, SearchSettings

    settings = SearchSettings(mode=getattr(args, "mode", "fielded"))
    return Retriever.load_or_build(Path(args.library), Path(args.cache_dir), progress=progress,
                                   settings=settings, rebuild_view=rebuild_view,
                                   dialogues=_dialogues(args) if dialogues is None else dialogues)


def cmd_build(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    r = _retriever(args)
    print(f"{r.size} diseases indexed from {r.library_path} in {time.perf_counter() - start:.2f}s")
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    r = _retriever(args, progress=not args.json)
    res = r.search(args.query, history=args.history or (), k=args.k)
    if args.json:
        print(json.dumps(res.to_dict(), ensure_ascii=False, indent=2))
        return 0
    print(f"keywords: {' '.join(res.keywords)}" + (f"   negated: {' '.join(res.negated)}" if res.negated else ""))
    print(f"confident: {res.confident}   latency: {res.latency_ms:.2f} ms   cues: {res.cues}")
    for i, h in enumerate(res.hits, 1):
        print(f"{i}. {h.disease.name} ({h.disease.id}) score={h.score:.3f} "
              f"fields={','.join(h.matched_fields)} keywords={','.join(h.matched_keywords[:8])}")
    if args.brief and res.hits:
        from knowledge.brief import write_brief, write_candidates

        brief = write_brief(res.hits[0].disease, args.brief) if res.confident else write_candidates(
            res.hits, args.brief)
        print("\n" + brief.text)
    return 0


def cmd_dialogues(args: argparse.Namespace) -> int:
    r = _retriever(args, rebuild_view=args.rebuild)
    if r.view is None:
        print(f"no dialogues folder beside {r.library_path} (give --dialogues DIR)", file=sys.stderr)
        return 1
    print(r.view.summary(r.index.meta.names))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from knowledge.dialogue_view import lay_dev_cases
    from knowledge.evaluate import evaluate

    data: Path | list[dict] = Path(args.data)
    if data.is_dir():  # a dialogues folder: its held-out questions that do not name their disease
        folder = _dialogue_folder(args.data, "--data")
        if args.dialogues not in ("auto", "none"):
            raise UsageError("--data DIR evaluates the view built from DIR's own training questions; "
                             "--dialogues may only be auto or none with it")
        r = _retriever(args, dialogues=folder)
        if r.view is None:
            raise UsageError(f"--data {args.data}: the dialogue view could not be built (see the warning above)")
        data = lay_dev_cases(r.view, r.index.meta.names, r.index.meta.aliases)
        if args.dialogues == "none":  # the same questions, searched without the view
            r = type(r)(r.index, r.settings)
    elif not data.is_file():
        raise UsageError(f"--data {args.data}: no such file or folder")
    else:
        r = _retriever(args)
    out = evaluate(r, data, Path(args.label_map) if args.label_map else None, split=args.split,
                   form=args.form)
    if not out["n"]:
        raise UsageError(f"--data {args.data}: no cases to evaluate")
    print(f"[{args.form}, split {args.split}] "
          f"n={out['n']}  top-1={out['top1']:.1%}  top-5={out['top5']:.1%}  MRR={out['mrr']:.3f}  "
          f"confident={out['confident_share']:.0%} ({out['confident_right']} right of {out['confident_n']})  "
          f"p50={out['p50_ms']:.2f} ms")
    if args.quiet:
        return 0
    print("ten worst misses (most confidently wrong first):")
    for m in out["worst_misses"]:
        print(f"  [{m['label']}] {m['query'][:60]} -> {' / '.join(m['got'][:3])}")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from knowledge.importer import import_library

    report = import_library(Path(args.source), Path(args.output), id_prefix=args.id_prefix)
    print(report.summary())
    for number, why in report.errors[: args.show_errors]:
        print(f"  line {number}: {why}", file=sys.stderr)
    return 0 if report.written else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m knowledge", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--library", required=True, help="disease library JSONL")
        p.add_argument("--cache-dir", default=str(DEFAULT_CACHE), help="index cache folder")
        p.add_argument("--mode", choices=("fielded", "plain"), default="fielded")
        p.add_argument("--dialogues", default="auto",
                       help="dialogue JSONL folder for the patients' view: auto (dialogues/ beside the "
                            "library, if any), none, or a folder")

    p = sub.add_parser("build", help="build (or load) the cached index")
    common(p)
    p.set_defaults(func=cmd_build)
    p = sub.add_parser("search", help="search the library")
    common(p)
    p.add_argument("query")
    p.add_argument("--history", action="append", help="an earlier patient turn (repeat, oldest first)")
    p.add_argument("-k", type=int, default=5)
    p.add_argument("--brief", type=int, default=0, help="also print a brief of this many characters")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_search)
    p = sub.add_parser("dialogues", help="build (or load) the dialogue view and summarise it")
    common(p)
    p.add_argument("--rebuild", action="store_true", help="rebuild even when cached")
    p.set_defaults(func=cmd_dialogues)
    p = sub.add_parser("eval", help="top-1 / top-5 / MRR on {query, label_disease} JSONL")
    common(p)
    p.add_argument("--data", required=True,
                   help="labelled JSONL, or a dialogues folder (its held-out questions that do not name "
                        "their disease; the view is built from the others; with --dialogues none they are "
                        "searched without it)")
    p.add_argument("--label-map", default=None)
    p.add_argument("--split", choices=("all", "a", "b"), default="all",
                   help="a = tuning half, b = held-out half of the file (fixed seed)")
    p.add_argument("--form", choices=("text", "list", "structured"), default="text",
                   help="the complaint as written, its findings as an EHR list string, or as a record")
    p.add_argument("--quiet", action="store_true", help="one line: no worst misses")
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser("import", help="normalise another library shape into the schema")
    p.add_argument("source")
    p.add_argument("output")
    p.add_argument("--id-prefix", default=None)
    p.add_argument("--show-errors", type=int, default=20)
    p.set_defaults(func=cmd_import)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except UsageError as exc:
        print(f"{parser.prog} {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
