"""Short, professional briefs of disease documents for the prompt, within a character budget.

Text is cut only at sentence ends (。！？； or a newline), never inside a sentence.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from knowledge.schema import Disease

SECTION_TITLES = {"symptoms": "症状", "diagnosis": "诊断", "treatment": "治疗", "prevention": "预防"}
_SENTENCE = re.compile(r"[^。！？；!?;\n]*[。！？；!?;\n]|[^。！？；!?;\n]+$")
_SPACES = re.compile(r"[ \t\u3000]+")


@dataclass
class Brief:
    text: str
    sections: list[str] = field(default_factory=list)
    disease_ids: list[str] = field(default_factory=list)


def sentences(text: str) -> list[str]:
    """Sentences with their end marks (a newline becomes '。' when the line had no end mark)."""
    out = []
    for m in _SENTENCE.finditer(_SPACES.sub(" ", text or "")):
        sent = m.group(0).strip()
        if sent.endswith("\n"):
            sent = sent.rstrip()
        if not sent or not sent.strip("。！？；!?;"):
            continue
        if sent[-1] not in "。！？；!?;：:":  # a line ending in a colon introduces the next one
            sent += "。"
        out.append(sent)
    return out


def _fit(parts: Sequence[str], budget: int) -> str:
    """Whole sentences, in order, while they fit."""
    out, used = [], 0
    for sent in parts:
        if used + len(sent) > budget:
            break
        out.append(sent)
        used += len(sent)
    return "".join(out)


def _section_text(disease: Disease, name: str) -> list[str]:
    if name == "symptoms":
        items = [s.rstrip(".…") for s in disease.symptoms if s.rstrip(".…")]
        lead = [f"常见症状：{'、'.join(items[:8])}。"] if items else []
        return lead + sentences(disease.description)[:2]
    if name == "treatment":
        parts = sentences(disease.treatment)
        if disease.treat_way and not parts:
            parts = [f"治疗方式：{'、'.join(disease.treat_way)}。"]
        return parts
    return sentences(disease.section(name))


def write_brief(disease: Disease, budget_chars: int) -> Brief:
    """A brief of one disease: header, then symptoms, diagnosis, treatment, prevention, within budget.

    Each section gets an even share of what is left; a share a section does not use passes on.
    """
    header = f"【参考资料：{disease.name}】"
    if budget_chars < len(header):
        return Brief(text="", sections=[], disease_ids=[])
    lines, used_sections = [header], []
    remaining = budget_chars - len(header)
    names = [n for n in SECTION_TITLES if _section_text(disease, n)]
    for i, name in enumerate(names):
        title = f"\n{SECTION_TITLES[name]}："
        share = remaining // (len(names) - i)
        body = _fit(_section_text(disease, name), share - len(title))
        if not body:
            continue
        lines.append(title + body)
        remaining -= len(title) + len(body)
        used_sections.append(name)
    return Brief(text="".join(lines), sections=used_sections, disease_ids=[disease.id])


def write_candidates(hits: Sequence, budget_chars: int, max_candidates: int = 3) -> Brief:
    """For an uncertain match: say so and list the top candidates, one short line each."""
    head = "【参考资料：根据描述尚不能确定是哪种疾病，可能的疾病有（仅供参考）】"
    if budget_chars < len(head):
        return Brief(text="", sections=[], disease_ids=[])
    lines, ids, used = [head], [], len(head)
    for hit in list(hits)[:max_candidates]:
        d: Disease = hit.disease
        symptoms = "、".join(s.rstrip(".…") for s in d.symptoms[:5] if s.rstrip(".…"))
        line = f"\n{len(ids) + 1}. {d.name}" + (f"：常见症状{symptoms}。" if symptoms else "。")
        if used + len(line) > budget_chars:
            line = f"\n{len(ids) + 1}. {d.name}。"
            if used + len(line) > budget_chars:
                break
        lines.append(line)
        ids.append(d.id)
        used += len(line)
    return Brief(text="".join(lines), sections=["candidates"], disease_ids=ids)
