"""ROME Explorer's web app: `python app.py` (also a Hugging Face Space's entry point).

The model is the embedded default unless ROME_EXPLORER_MODEL names another (a hub name or a local folder);
Gradio reads GRADIO_SERVER_NAME / GRADIO_SERVER_PORT and binds to 127.0.0.1 without them.
"""
from __future__ import annotations

from explorer.app.ui import launch

if __name__ == "__main__":
    launch()
