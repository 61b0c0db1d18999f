"""Examples → token ids with the served prompt format, labels masked on the prompt, padded batches."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llm.chat_format import encode_plain, render
from llm.prompt import compose_message

from .data import Example

log = logging.getLogger(__name__)
IGNORE = -100  # label value the loss skips


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]


def prompt_text(example: Example, brief: str = "") -> str:
    """The user message exactly as the service builds it (compose_message)."""
    return compose_message(example.question, brief)


def encode(tokenizer: Any, example: Example, max_len: int = 512, max_target: int = 100,
           brief: str = "") -> Encoded:
    """Prompt ids (render: chat template or ChatGLM-6B `[Round 0]\\n问：…\\n答：`) + answer ids + EOS.

    The answer is cut to max_target tokens (then EOS, so the model learns to stop); a prompt that does not
    fit keeps its tail, where the question and the answer cue are. Labels are IGNORE on the prompt.
    """
    prompt = render(tokenizer, [], prompt_text(example, brief))
    target = encode_plain(tokenizer, example.answer)[:max_target]  # dialogue text: no control tokens from it
    target = target + [tokenizer.eos_token_id]
    room = max(1, max_len - len(target))
    prompt = prompt[-room:]
    return Encoded(prompt + target, [IGNORE] * len(prompt) + target)


def collate(batch: list[Encoded], pad_id: int) -> dict[str, Any]:
    """Right padding (training needs no left padding); pads are masked out of attention and loss."""
    import torch

    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, e in enumerate(batch):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


BriefFn = Callable[[str], str]


def brief_provider(knowledge_path: Path | None, cache_dir: Path, brief_chars: int = 600) -> BriefFn | None:
    """question → the prompt designer's brief of the top disease (knowledge.search + knowledge.brief).

    Returns None (and logs why) when the knowledge package cannot be used, so training goes on without briefs.
    """
    try:
        from knowledge.search import Retriever
        from llm.designer import PromptDesigner
        from llm.paths import SAMPLE_LIBRARY
        from safety.triage import Triage

        # No dialogue view: most of the dialogue questions are LoRA training data, whose briefs would be
        # better than a new patient's.
        retriever = Retriever.load_or_build(Path(knowledge_path or SAMPLE_LIBRARY), cache_dir / "index",
                                            progress=False, dialogues=False)
    except Exception as exc:  # optional feature: report and go on
        log.warning("no briefs: the knowledge index could not be loaded (%s)", exc)
        return None
    # The serving designer decides the brief (one disease, or the uncertain candidate list), so the model
    # is trained on the prompts it will be served.
    designer = PromptDesigner(retriever, brief_chars=brief_chars, triage=Triage.from_file())

    def brief(question: str) -> str:
        try:
            chosen = designer.brief(question)[1]
            return chosen.text if chosen is not None else ""
        except Exception as exc:
            log.debug("brief failed: %s", type(exc).__name__)
            return ""

    return brief


def encode_all(tokenizer: Any, examples: list[Example], max_len: int, max_target: int,
               with_brief: float = 0.0, brief: BriefFn | None = None, seed: int = 0,
               progress: bool = False) -> list[Encoded]:
    """Encode a split; a seeded with_brief fraction of prompts carries the brief (when one is available)."""
    from tqdm import tqdm

    rng = random.Random(seed)
    out = []
    for ex in tqdm(examples, desc="encoding", unit="ex", disable=not progress, leave=False, mininterval=2):
        text = brief(ex.question) if brief is not None and with_brief > 0 and rng.random() < with_brief else ""
        out.append(encode(tokenizer, ex, max_len, max_target, text))
    return out
