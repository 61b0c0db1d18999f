"""The model layer that serving and training share.

Model families and their checkpoints (loading, conversion of the original ChatGLM layouts, the
ChatGLM-6B implementation), chat formats, the prompt text and the prompt designer, and the tiny model
builder used by tests and the embedded default. It knows nothing of HTTP: `service` and `training`
both import it, never the other way round.
"""
