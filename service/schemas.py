"""Request and response models. Bounds are declared once here and reused by every endpoint."""

from __future__ import annotations

import unicodedata
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, Strict, StringConstraints, model_validator

from knowledge.patient import PatientContext

from .engine.types import SamplingParams

# Hard ceilings that hold whatever the settings say; the settings can only lower them.
HARD_MAX_CHARS = 32_000
HARD_MAX_TOKENS = 8192
HARD_MAX_HISTORY = 100
MAX_STOP = 4
MAX_STOP_CHARS = 32



def has_visible_text(text: str) -> bool:
    """True when the text has a character a reader can see: not only spaces, controls or format characters
    (zero-width space, joiners, BOM, bidi marks)."""
    return any(not ch.isspace() and unicodedata.category(ch)[0] not in "CZ" for ch in text)


def require_visible(text: str) -> str:
    if not has_visible_text(text):
        raise ValueError("must contain visible text (not only spaces or zero-width characters)")
    return text


# Every text field is a JSON string (pydantic rejects non-strings and lone surrogates) under a hard ceiling.
Text = Annotated[str, StringConstraints(max_length=HARD_MAX_CHARS)]
NonBlank = Annotated[str, StringConstraints(min_length=1, max_length=HARD_MAX_CHARS, pattern=r"\S"),
                     AfterValidator(require_visible)]
StopString = Annotated[str, StringConstraints(min_length=1, max_length=MAX_STOP_CHARS)]
# Numbers and flags are taken as JSON gives them: no "0.5" strings, no true-for-1, no 1.0-for-1.
Int = Annotated[int, Strict()]
Float = Annotated[float, Strict()]
Bool = Annotated[bool, Strict()]

# Sampling defaults are the engine's (SamplingParams), written once there. One deliberate difference:
# /chat applies a repetition penalty of 1.1 by default (small models loop without it; ChatGLM-style clients
# never send one), /v1 keeps OpenAI's meaning of an unset field (no penalty, 1.0).
SAMPLING_DEFAULTS = SamplingParams()
CHAT_REPETITION_PENALTY = 1.1
temperature_field = Field(SAMPLING_DEFAULTS.temperature, ge=0.0, le=2.0, description="0 = greedy")
top_p_field = Field(SAMPLING_DEFAULTS.top_p, gt=0.0, le=1.0)
top_k_field = Field(SAMPLING_DEFAULTS.top_k, ge=0, le=1000, description="0 = off")
repetition_penalty_field = Field(CHAT_REPETITION_PENALTY, ge=0.5, le=2.0, description="1 = off")
seed_field = Field(None, ge=0, le=2**63 - 1)
max_new_tokens_field = Field(None, ge=1, le=HARD_MAX_TOKENS)
min_new_tokens_field = Field(0, ge=0, le=HARD_MAX_TOKENS, description="suppress end-of-text before this")


MAX_FINDINGS = 50
Finding = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"\S"), AfterValidator(require_visible)]


class PatientRecord(BaseModel):
    """Structured facts from the patient's record (an EHR), read beside the free text. All optional."""

    model_config = ConfigDict(extra="forbid")

    age: Float | None = Field(None, ge=0, le=130, description="Age in years (or give age_months)")
    age_months: Float | None = Field(None, ge=0, le=130 * 12, description="Age in months, for infants")
    sex: Literal["female", "male"] | None = None
    symptoms: list[Finding] = Field(default_factory=list, max_length=MAX_FINDINGS,
                                    description="Findings present, e.g. [\"咳嗽\", \"咳痰\"]")
    negated_symptoms: list[Finding] = Field(default_factory=list, max_length=MAX_FINDINGS,
                                            description="Findings the record denies, e.g. [\"发热\"]")
    duration: Annotated[str, StringConstraints(max_length=64)] | None = Field(None, description="e.g. 3天")
    department: Annotated[str, StringConstraints(max_length=64)] | None = Field(
        None, description="The requesting department; a paediatric one marks a child when no age is given")

    @model_validator(mode="after")
    def _one_age(self) -> PatientRecord:
        if self.age is not None and self.age_months is not None:
            raise ValueError("give age or age_months, not both")
        return self

    def to_context(self) -> PatientContext:
        return PatientContext.from_fields(age=self.age, age_months=self.age_months, sex=self.sex,
                                          symptoms=self.symptoms, negated_symptoms=self.negated_symptoms,
                                          duration=self.duration, department=self.department)


patient_field = Field(None, description="Structured patient facts (age, sex, findings present and denied)")


class ChatRequest(BaseModel):
    """The ChatGLM-6B api.py body, extended. Unknown fields are rejected so typos do not pass silently."""

    model_config = ConfigDict(extra="forbid")

    prompt: NonBlank = Field(description="The patient's question")
    history: list[tuple[Text, Text]] | None = Field(default_factory=list, max_length=HARD_MAX_HISTORY,
                                                    description="Earlier [question, answer] pairs, oldest first")
    max_length: Int | None = Field(None, ge=16, le=32768, description="Prompt + answer token cap (ChatGLM api.py)")
    max_new_tokens: Int | None = max_new_tokens_field
    min_new_tokens: Int = min_new_tokens_field
    temperature: Float = temperature_field
    top_p: Float = top_p_field
    top_k: Int = top_k_field
    repetition_penalty: Float = repetition_penalty_field
    seed: Int | None = seed_field
    stop: list[StopString] = Field(default_factory=list, max_length=MAX_STOP)
    stream: Bool = False
    use_knowledge: Bool = True
    patient: PatientRecord | None = patient_field

    @model_validator(mode="after")
    def _min_within_max(self) -> ChatRequest:
        check_min_within_max(self.min_new_tokens, self.max_new_tokens, "min_new_tokens", "max_new_tokens")
        return self


def check_min_within_max(minimum: int, maximum: int | None, min_name: str, max_name: str) -> None:
    if maximum is not None and minimum > maximum:
        raise ValueError(f"{min_name} ({minimum}) must not exceed {max_name} ({maximum})")


class ErrorDetail(BaseModel):
    model_config = ConfigDict(extra="allow")

    code: str = Field(description="Stable machine-readable code, e.g. invalid_request, queue_full")
    message: str
    request_id: str | None = None


class ErrorResponse(BaseModel):
    """The one error shape of every endpoint."""

    model_config = ConfigDict(extra="allow")

    error: ErrorDetail


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for the given error statuses, all with the one error shape."""
    meaning = {400: "Malformed JSON or bad UTF-8", 401: "Missing or wrong API key",
               408: "The body did not arrive within DOCTORGLM_BODY_TIMEOUT_S", 413: "Body too large",
               414: "URL too long", 415: "The body is not JSON", 422: "Invalid field",
               429: "Queue full (see Retry-After)", 431: "Headers too large", 500: "Generation failed",
               503: "Not ready or draining (see Retry-After)"}
    return {code: {"model": ErrorResponse, "description": meaning.get(code, "Error")} for code in statuses}


# One server-sent event; `data` is JSON text (or [DONE] at the end of an OpenAI stream).
SSE_CONTENT = {"text/event-stream": {"schema": {
    "type": "object", "properties": {"event": {"type": "string"}, "data": {"type": "string"},
                                     "id": {"type": "string"}, "retry": {"type": "integer"}}}}}
CHAT_ERRORS = (400, 401, 408, 413, 414, 415, 422, 429, 431, 500, 503)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Reference(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: str
    name: str
    score: float
    matched_keywords: list[str] = Field(default_factory=list)
    matched_fields: list[str] = Field(default_factory=list)
    rank: int | None = None
    used_in_prompt: bool = False
    sections: list[str] = Field(default_factory=list)


class Safety(BaseModel):
    level: Literal["emergency", "none"]
    rules: list[str] = Field(default_factory=list)
    advice: str = ""
    notice: str = ""


class ChatResponse(BaseModel):
    response: str
    history: list[tuple[str, str]]
    status: int = 200
    time: str
    id: str
    references: list[Reference]
    keywords: list[str]
    usage: Usage
    finish_reason: str
    safety: Safety
    uncertain: bool = False
    patient: dict[str, Any] = Field(default_factory=dict, description="What retrieval used from `patient`")


class SearchHit(Reference):
    pass


class SearchResponse(BaseModel):
    query: str
    keywords: list[str]
    confident: bool
    results: list[SearchHit]
    latency_ms: float
    negated: list[str] = Field(default_factory=list)
    patient: dict[str, Any] = Field(default_factory=dict, description="What retrieval used from `patient`")


class SearchRequest(BaseModel):
    """POST /knowledge/search: free text, a patient record, or both."""

    model_config = ConfigDict(extra="forbid")

    q: Annotated[str, StringConstraints(max_length=4000)] = Field("", description="Free-text complaint")
    k: Int = Field(5, ge=1, le=50)
    patient: PatientRecord | None = patient_field

    @model_validator(mode="after")
    def _something_to_search(self) -> SearchRequest:
        if not has_visible_text(self.q) and not (self.patient and self.patient.symptoms):
            raise ValueError("give q (free text) or patient.symptoms")
        return self


# ----- OpenAI-compatible -----

class TextPart(BaseModel):
    """An OpenAI content part. Only text parts are served; `text` is validated like a plain-string content."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["text"]
    text: Text


class OpenAIMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Text | Annotated[list[TextPart], Field(max_length=64)] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: Bool | None = False


class ChatCompletionRequest(BaseModel):
    """OpenAI chat completions; fields that standard clients send but we do not use are ignored."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(None, max_length=256)
    messages: list[OpenAIMessage] = Field(min_length=1, max_length=2 * HARD_MAX_HISTORY + 2)
    # Clients send null for "not set": null means the default.
    temperature: Float | None = temperature_field
    top_p: Float | None = top_p_field
    max_tokens: Int | None = max_new_tokens_field
    max_completion_tokens: Int | None = max_new_tokens_field
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP)] | None = None
    seed: Int | None = seed_field
    n: Int | None = Field(1, ge=1, le=1, description="only 1 is supported")
    user: str | None = Field(None, max_length=256)
    stream: Bool | None = False
    stream_options: StreamOptions | None = None
    # Extensions (vLLM-style names):
    top_k: Int = top_k_field
    repetition_penalty: Float = Field(SAMPLING_DEFAULTS.repetition_penalty, ge=0.5, le=2.0, description="1 = off")
    min_tokens: Int = min_new_tokens_field
    use_knowledge: Bool = True
    patient: PatientRecord | None = patient_field

    @model_validator(mode="after")
    def _min_within_max(self) -> ChatCompletionRequest:
        check_min_within_max(self.min_tokens, self.max_completion_tokens or self.max_tokens, "min_tokens",
                             "max_tokens")
        return self

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)
