"""The Gradio app: what only the app needs, apart from the engines.

- ``ui``: the page's layout, its event handlers (one module per tab), per-visitor sessions and jobs. The only
  package that imports gradio.
- ``plots``: results → plotly figures and HTML (the only module that imports plotly).
- ``model_policy``: which models visitors may load, and how large; ``limits``: the per-request caps.
- ``preparation``: the start-up work on a shared model (load, then prepare its first edit) in the background.
- ``caches``: a small thread-safe most-recently-used cache.
- ``scheduler``: the turns visitors' jobs take on the shared cores, step by step, in an order fair to visitors.
- ``allocator``: glibc malloc's settings for a server whose jobs run in worker threads (app.py applies them).
"""
