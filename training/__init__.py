"""Offline training: dialogue data → LoRA / P-tuning v2 adapter → evaluated, merged model the service loads.

`python -m training --help` lists the commands. Training builds prompts with `llm.prompt.compose_message`
and `llm.chat_format.render`, so what the model is trained on is what it is served.
"""
