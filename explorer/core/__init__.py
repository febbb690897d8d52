"""The foundations every engine stands on; nothing here knows about tracing, editing or the app.

- ``models``: :class:`LoadedModel` (model, tokenizer, architecture adapter) and loading, the default model's
  converted cache included; ``architectures``: every family-specific fact in one table; ``offload``: weights
  that accelerate keeps off the device.
- ``weights``: the one owner of a loaded model's weights, their lock and the values derived from them.
- ``hooks``: read or replace a module's input or output during a forward pass, always removed on exit.
- ``prompts``: tokenising a prompt and finding its subject; ``errors``: the errors a user can act on.
- ``generation`` and ``scoring``: greedy and sampled completions, target probabilities, predictions;
  ``kv_cache``: the one place that builds a transformers key/value cache.
- ``facts``: fact sets in ``known_1000.json``'s format; ``assets``: where the bundled data files are.
- ``progress``: the progress/cancel callback every long job takes; ``atomic``: files readers never see
  half-written.
"""
