"""`vidlora serve`: an OpenAI-compatible chat API (text, images, video) over one base and its adapters.

protocol (request/response shapes, errors) → messages (OpenAI messages → a generation request) →
media (URLs → files, inside the allowed folder) → engine (queue, batches, streaming) → app (HTTP).
"""
