"""The prompt designer: retrieval → brief of the most likely disease → the model's user message.

A pure function of the question, the history and the index (plus the safety assessment's note).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from knowledge.brief import Brief, write_brief, write_candidates
from knowledge.patient import PatientContext
from knowledge.search import Retriever, SearchResult
from safety.triage import Triage

from .chat_format import ChatTurn
from .prompt import compose_message, is_chinese, shared_beginning

UNCERTAIN_NOTE = {
    "zh": "说明：根据目前的描述，知识库还不能确定是哪一种疾病，参考资料列出的只是几种可能，请由医生面诊确认。",
    "en": "Note: from this description the knowledge base cannot tell which disease this is; the references "
          "list several possibilities only, and a doctor needs to confirm in person.",
}
NO_MATCH_NOTE = {
    "zh": "说明：知识库中没有找到与描述明显相关的疾病资料，以下回答没有资料依据，请由医生面诊确认。",
    "en": "Note: the knowledge base has no document that clearly matches this description; the answer is not "
          "grounded in it, and a doctor needs to confirm in person.",
}


@dataclass
class DesignedPrompt:
    """What the designer decided for one request; references go back to the caller unchanged."""

    message: str
    keywords: list[str] = field(default_factory=list)
    references: list[dict[str, Any]] = field(default_factory=list)
    confident: bool = False
    retrieval_ms: float = 0.0
    # Shown to the user with the answer when retrieval cannot single out one disease (honest uncertainty).
    uncertainty_note: str = ""
    # What retrieval took from a structured patient record (PatientContext.used()); empty without one.
    patient: dict[str, Any] = field(default_factory=dict)
    # The start of `message` with no patient text in it (prompt.shared_beginning): the prompt cache may keep it.
    shared_prefix: str = ""


def triage_facts(patient: PatientContext | None) -> dict[str, Any]:
    """A record's facts as `Triage.assess` keyword arguments (none without a record)."""
    if patient is None:
        return {}
    return {"age_months": patient.age_months, "sex": patient.sex, "symptoms": patient.symptoms,
            "negated_symptoms": patient.negated_symptoms}


class PromptDesigner:
    def __init__(self, retriever: Retriever, *, brief_chars: int = 600, k: int = 3,
                 triage: Triage | None = None) -> None:
        self.retriever = retriever
        self.brief_chars = brief_chars
        self.k = k
        # With triage, an emergency's suspected conditions (the fired rules' "suspects") rank first.
        self.triage = triage

    def brief(self, question: str, history: Sequence[str] = (), suspects: Sequence[str] | None = None,
              patient: PatientContext | None = None) -> tuple[SearchResult, Brief | None]:
        """Retrieval and the brief for the prompt; training calls this too, so it learns the served prompt.

        One disease when it is clearly ahead; otherwise the question is uncertain and the brief lists the
        candidates.
        """
        if suspects is None:  # the caller has not assessed the complaint: assess it here
            suspects = self.triage.assess(question, history, **triage_facts(patient)).suspects \
                if self.triage is not None else []
        result = self.retriever.search(question, history=history, k=self.k, suspects=suspects, patient=patient)
        if not result.hits:
            return result, None
        if result.confident:
            return result, write_brief(result.hits[0].disease, self.brief_chars)
        return result, write_candidates(result.hits, self.brief_chars)

    def design(self, question: str, history: list[ChatTurn] | None = None, *, use_knowledge: bool = True,
               urgent_note: str = "", suspects: Sequence[str] | None = None,
               patient: PatientContext | None = None) -> DesignedPrompt:
        history = history or []
        if not use_knowledge:
            return DesignedPrompt(message=compose_message(question, "", urgent_note),
                                  shared_prefix=shared_beginning(question, "", urgent_note))
        started = time.perf_counter()
        result, brief = self.brief(question, [t.user for t in history], suspects, patient)
        references = []
        for rank, hit in enumerate(result.hits):
            ref = hit.to_dict()
            used = brief is not None and hit.disease.id in brief.disease_ids
            ref["rank"] = rank + 1
            ref["used_in_prompt"] = used
            ref["sections"] = list(brief.sections) if used and brief is not None else []
            references.append(ref)
        lang = "zh" if is_chinese(question) else "en"
        if not result.hits:
            note = NO_MATCH_NOTE[lang]
        elif result.confident:
            note = ""
        else:
            note = UNCERTAIN_NOTE[lang]
        return DesignedPrompt(
            message=compose_message(question, brief.text if brief else "", urgent_note),
            shared_prefix=shared_beginning(question, brief.text if brief else "", urgent_note),
            keywords=list(result.keywords),
            references=references,
            confident=bool(result.confident),
            retrieval_ms=(time.perf_counter() - started) * 1000,
            uncertainty_note=note,
            patient=patient.used() if patient is not None else {},
        )
