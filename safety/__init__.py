"""Clinical safety layer: red-flag triage of patient complaints (pure, no HTTP, no model)."""

from safety.language import detect_language
from safety.triage import DEFAULT_RULES_PATH, SafetyAssessment, Triage

__all__ = ["DEFAULT_RULES_PATH", "SafetyAssessment", "Triage", "detect_language"]
