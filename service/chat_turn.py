"""A chat turn's data: what every endpoint normalises a request to (ChatInput), and an accepted turn
(ChatStart) as orchestration, event translation and the audit record share it."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from knowledge.patient import PatientContext
from llm.designer import DesignedPrompt

from .engine.contract import EngineStream
from .engine.types import ChatTurn, SamplingParams
from .errors import APIError


@dataclass
class ChatInput:
    """A chat turn as every endpoint normalises it."""

    question: str
    history: list[ChatTurn]
    params: SamplingParams
    use_knowledge: bool = True
    max_length: int | None = None
    route: str = "/chat"
    patient: PatientContext | None = None  # structured facts from the patient's record


@dataclass
class ChatStart:
    id: str
    request_id: str
    key_id: str
    input: ChatInput
    designed: DesignedPrompt
    safety: dict[str, Any]
    handle: EngineStream
    started: float
    received_at: float = field(default_factory=time.time)
    text: list[str] = field(default_factory=list)
    opened: bool = False  # run_chat began: it owns the audit record from then on
    audited: bool = False
    error: APIError | None = None  # why run_chat yielded an `error` event (its status and headers included)
