"""Helpers shared by the tests (``tests/``) and the benchmarks (``benchmarks/``) of a source checkout.

They are importable wherever the package is (``pip install -e .``), so neither the tests nor the benchmarks reach
into each other's folders. The app never imports them. ``app_server`` starts the checkout's ``python app.py`` on a
free port and Debian's Chromium through Playwright, ``page`` drives the app's page in that browser, ``oracle`` is
the straightforward per-cell causal trace that the engine is checked (tests) and timed (benchmarks) against,
importing nothing from ``explorer``; ``reference_trace`` is the plain per-cell executor over the engine's own
runs and cells; ``edit_oracle`` is ROME's edit written plainly, importing nothing from ``explorer``.
"""
