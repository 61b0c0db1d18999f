"""`python -m training prepare|train|eval|merge|convert|demo` — see `python -m training <command> --help`."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import fields
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

from .config import TrainConfig  # noqa: E402

_HELP_OVERRIDES = {
    "method": "lora (paper), ptuning (P-tuning v2 = peft prefix tuning) or full fine-tuning",
    "target_modules": "comma-separated; default: the model family's (llm/families.py: q_proj,v_proj on GLM, "
                      "query_key_value on converted ChatGLM-6B)",
    "with_brief": "fraction (0-1) of prompts that carry the prompt designer's disease brief",
    "max_steps": "stop after this many optimizer steps (0: use --epochs)",
    "max_seconds": "stop after this many seconds, keeping the best checkpoint (0: no limit)",
    "early_stop_patience": "stop after N evaluations without a val-loss improvement (0: off)",
    "dtype": "auto = fp32 on CPU, bf16 (else fp16) on GPU",
}


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field, defaults shown (the paper's recipe)."""
    group = parser.add_argument_group("training settings (defaults: the DoctorGLM paper)")
    for f in fields(TrainConfig):
        if f.name == "extra":
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        kind = {"int": int, "float": float, "bool": _bool}.get(type(default).__name__, str)
        help_text = _HELP_OVERRIDES.get(f.name, "") + f" (default: {default})"
        group.add_argument(flag, dest=f.name, type=kind, default=None, help=help_text.strip())


def config_from(args: argparse.Namespace) -> TrainConfig:
    cfg = TrainConfig.load(Path(args.config)) if getattr(args, "config", None) else TrainConfig()
    for f in fields(TrainConfig):
        value = getattr(args, f.name, None)
        if value is None:
            continue
        if f.name == "target_modules":
            value = [v.strip() for v in str(value).split(",") if v.strip()]
        setattr(cfg, f.name, value)
    return cfg


def load_split(data: list[Path], seed: int) -> tuple[list, list]:
    """A prepared directory (train.jsonl + val.jsonl) or raw files/directories prepared on the fly."""
    from .data import load_examples, prepare

    if len(data) == 1 and (data[0] / "train.jsonl").is_file():
        val = data[0] / "val.jsonl"
        return load_examples(data[0] / "train.jsonl"), load_examples(val) if val.is_file() else []
    prepared = prepare(data, seed=seed)
    for report in prepared.reports:
        print(report.summary(), file=sys.stderr)
    return prepared.train, prepared.val


def cmd_prepare(args: argparse.Namespace) -> int:
    from .data import prepare, write_jsonl

    prepared = prepare(args.data, args.val_fraction, args.seed, args.min_chars, args.max_question_chars,
                       args.max_answer_chars, args.limit)
    out = Path(args.out)
    write_jsonl(prepared.train, out / "train.jsonl")
    write_jsonl(prepared.val, out / "val.jsonl")
    report = {"files": [r.to_dict() for r in prepared.reports], "dropped": prepared.dropped,
              "train": len(prepared.train), "val": len(prepared.val), "seed": args.seed}
    (out / "report.json").write_text(json.dumps(report, ensure_ascii=False, indent=2), encoding="utf-8")
    for r in prepared.reports:
        print(r.summary())
    print(f"dropped: {prepared.dropped or 'none'}; train {len(prepared.train)}, val {len(prepared.val)} → {out}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from llm.families import original_family, read_config

    from .trainer import Trainer

    if original_family(read_config(Path(args.model))) is not None:
        print(f"{args.model} is an original ChatGLM checkpoint (remote code): convert it first with "
              f"`python -m training convert {args.model} <converted>` and train on <converted>", file=sys.stderr)
        return 2
    cfg = config_from(args)
    train, val = load_split(args.data, cfg.seed)
    result = Trainer(cfg, Path(args.model), Path(args.out), progress=not args.quiet).run(train, val, args.resume)
    print(json.dumps({"run_dir": str(result.run_dir), "best": str(result.best_dir), "steps": result.steps,
                      "stopped": result.stopped, "best_val_loss": result.best_val_loss,
                      "samples_per_s": round(result.samples_per_s, 2)}, ensure_ascii=False))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .data import load_examples
    from .features import encode_all
    from .probe import run_probe
    from .trainer import evaluate

    tokenizer = AutoTokenizer.from_pretrained(args.adapter or args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    if args.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, args.adapter)
    result: dict[str, object] = {}
    if args.data:
        examples = load_examples(Path(args.data))[: args.max_examples]
        result["val_loss"] = evaluate(model, encode_all(tokenizer, examples, 512, 100), tokenizer.pad_token_id)
    probe = run_probe(model, tokenizer, 0, args.max_new_tokens)
    result["probe"] = probe.to_dict()
    print(json.dumps(result, ensure_ascii=False, indent=2))
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from .merge import merge

    out = merge(Path(args.adapter), Path(args.out), Path(args.base) if args.base else None, args.dtype)
    print(f"merged → {out}\nserve it: DOCTORGLM_MODEL_PATH={out} make serve")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from llm.convert import ConversionError, convert

    try:
        result = convert(Path(args.source), Path(args.out), adapter=Path(args.adapter) if args.adapter else None)
    except ConversionError as exc:
        print(f"cannot convert: {exc}", file=sys.stderr)
        return 2
    merged = f", adapter {result.adapter} merged" if result.adapter else ""
    print(f"converted {args.source} ({result.family.name}{merged}) → {result.out_dir} in {result.seconds:.1f} s "
          f"({result.tensors} tensors, {result.shards} safetensors shards)")
    print(f"serve it:  DOCTORGLM_MODEL_PATH={result.out_dir} make serve")
    print(f"train on it:  python -m training train --model {result.out_dir} --data <dialogues> --out <run>")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(budget_s=args.budget_s, data_dir=Path(args.data) if args.data else None,
             out_dir=Path(args.out) if args.out else None, run_dir=Path(args.run_dir) if args.run_dir else None)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__.split("—")[0] + "— "
                                     "dialogues → LoRA / P-tuning v2 adapter → evaluated, merged model.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="read, clean, dedup and split dialogue files into train.jsonl/val.jsonl")
    p.add_argument("--data", nargs="+", type=Path, required=True, help="CMD CSV / JSONL / JSON files or directories")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--val-fraction", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--min-chars", type=int, default=4)
    p.add_argument("--max-question-chars", type=int, default=1000)
    p.add_argument("--max-answer-chars", type=int, default=2000)
    p.add_argument("--limit", type=int, default=0, help="keep at most N examples (seeded sample; 0: all)")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("train", help="train a LoRA / P-tuning v2 adapter (or full fine-tune) with eval + probe")
    p.add_argument("--model", required=True, help="base model directory (transformers format)")
    p.add_argument("--data", nargs="+", type=Path, required=True,
                   help="a `prepare` output directory, or raw files/directories (prepared on the fly)")
    p.add_argument("--out", required=True, help="run directory: checkpoint-last/, best/, metrics.json, curves.png")
    p.add_argument("--config", help="a train_config.json to start from (flags override it)")
    p.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint-last")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_config_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="validation loss + collapse probe of a model (optionally with an adapter)")
    p.add_argument("--model", required=True)
    p.add_argument("--adapter")
    p.add_argument("--data", help="JSONL of {question, answer} for a validation loss")
    p.add_argument("--max-examples", type=int, default=200)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("merge", help="merge a LoRA adapter into its base → a directory for DOCTORGLM_MODEL_PATH")
    p.add_argument("--adapter", required=True, help="adapter directory (e.g. <run>/best)")
    p.add_argument("--base", help="base model (default: the one recorded in adapter_config.json)")
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("convert", help="an original ChatGLM-6B/2/3 checkpoint → a directory transformers 5 loads "
                       "without remote code (safetensors, tokenizer.json, chat template)")
    p.add_argument("source", help="the original checkpoint directory (config.json with auto_map, pytorch_model*.bin)")
    p.add_argument("out", help="output directory (new or empty)")
    p.add_argument("--adapter", help="a peft LoRA adapter trained on the ORIGINAL layout (e.g. DoctorGLM's "
                   "query_key_value LoRA), merged before the conversion")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("demo", help="`make demo-model`: pretrain the tiny GLM, LoRA it, merge into the cache")
    p.add_argument("--budget-s", type=float, default=540, help="total training time budget in seconds")
    p.add_argument("--data", help="dialogue directory (default: ../shared/data/dialogues, else the project's)")
    p.add_argument("--out", help="merged model directory (default: $DOCTORGLM_CACHE_DIR/demo-model)")
    p.add_argument("--run-dir", help="where runs, curves and metrics go (default: artifacts/demo-model)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
