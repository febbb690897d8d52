"""ROME Explorer's web app: `python app.py` (also a Hugging Face Space's entry point)."""
from __future__ import annotations

import os

from explorer.ui import build_app

if __name__ == "__main__":
    demo = build_app()
    demo.queue(default_concurrency_limit=1, max_size=int(os.environ.get("ROME_EXPLORER_QUEUE", "16")))
    # Gradio reads GRADIO_SERVER_NAME / GRADIO_SERVER_PORT; without them it binds to 127.0.0.1.
    demo.launch()
