"""ROME Explorer's web app: `python app.py` (also a Hugging Face Space's entry point).

The model is the embedded default unless ROME_EXPLORER_MODEL names another (a hub name or a local folder);
Gradio reads GRADIO_SERVER_NAME / GRADIO_SERVER_PORT and binds to 127.0.0.1 without them.
"""
from __future__ import annotations

from explorer.app.allocator import share_one_heap

share_one_heap()  # before torch or Gradio start a thread: explorer/app/allocator.py says why

from explorer.app.ui import launch  # noqa: E402 - after the allocator's settings, on purpose

if __name__ == "__main__":
    launch()
