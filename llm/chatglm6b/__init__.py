"""The project's ChatGLM-6B implementation, registered with transformers' Auto classes on import.

After `import llm.chatglm6b`, a converted directory (config.json model_type "chatglm6b-doctorglm") loads
with AutoConfig / AutoModel / AutoModelForCausalLM and no remote code.
"""

from __future__ import annotations

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from ..families import CHATGLM6B_MODEL_TYPE
from .configuration import ChatGLM6BConfig
from .modeling import ChatGLM6BForCausalLM, ChatGLM6BModel
from .positions import ChatGLM6BPositions

AutoConfig.register(CHATGLM6B_MODEL_TYPE, ChatGLM6BConfig, exist_ok=True)
AutoModel.register(ChatGLM6BConfig, ChatGLM6BModel, exist_ok=True)
AutoModelForCausalLM.register(ChatGLM6BConfig, ChatGLM6BForCausalLM, exist_ok=True)

__all__ = ["ChatGLM6BConfig", "ChatGLM6BForCausalLM", "ChatGLM6BModel", "ChatGLM6BPositions"]
