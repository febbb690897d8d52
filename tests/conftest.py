"""Shared fixtures: tiny random models of every supported family, and the real default model."""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

# Hooks: under CI a skip (while collected or run), an xfail and an xpass are failures.
from tests.ci_strict import pytest_make_collect_report, pytest_runtest_makereport  # noqa: F401

REPO = Path(__file__).resolve().parent.parent
# One cache for the whole test session, inside the checkout (ignored by git): a fresh CI clone converts
# the embedded model once, through the real loader, and every later test reloads that copy.
os.environ.setdefault("ROME_EXPLORER_CACHE", str(REPO / ".cache" / "test-cache"))

CORPUS = [fact for fact in (REPO / "assets" / "known_facts.json").read_text().split('"prompt": ')[1:]]


def _tiny_tokenizer(with_bos: bool):
    """A byte-level BPE tokenizer trained on the bundled prompts, with or without a BOS token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [line.split('",')[0].strip('"') for line in CORPUS]
    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<bos>", "<eos>", "<pad>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(texts, trainer)
    if with_bos:
        tokenizer.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 0)])
    else:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")


def tiny_config(family: str, vocab: int):
    """A 4-layer random-weight config of ``family`` (grouped-query attention where the family has it)."""
    import transformers as tf

    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4)
    if family == "gpt2":
        return tf.GPT2Config(vocab_size=vocab, n_embd=64, n_layer=4, n_head=4, n_positions=128)
    if family == "gptj":
        return tf.GPTJConfig(vocab_size=vocab, n_embd=64, n_layer=4, n_head=4, rotary_dim=8, n_positions=128)
    if family == "gpt_neox":
        return tf.GPTNeoXConfig(**common, max_position_embeddings=128, rotary_pct=0.25)
    if family == "llama":
        return tf.LlamaConfig(**common, num_key_value_heads=2)
    if family == "mistral":
        return tf.MistralConfig(**common, num_key_value_heads=2, sliding_window=None)
    if family == "qwen2":
        return tf.Qwen2Config(**common, num_key_value_heads=2)
    if family == "qwen3":
        return tf.Qwen3Config(**common, num_key_value_heads=2, head_dim=16)
    if family == "gemma":
        return tf.GemmaConfig(**common, num_key_value_heads=1, head_dim=16)
    if family == "gemma2":
        return tf.Gemma2Config(**common, num_key_value_heads=2, head_dim=16, sliding_window=64)
    if family == "gemma3_text":
        return tf.Gemma3TextConfig(**common, num_key_value_heads=1, head_dim=16, sliding_window=64)
    if family == "gemma3_text_short_window":  # sliding window shorter than the prompts: no key/value reuse
        return tf.Gemma3TextConfig(**common, num_key_value_heads=1, head_dim=16, sliding_window=4)
    if family == "phi3":
        return tf.Phi3Config(**common, num_key_value_heads=2, pad_token_id=2)
    raise KeyError(family)


FAMILIES = ["gpt2", "gptj", "gpt_neox", "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3"]
WITH_BOS = {"llama", "mistral", "gemma", "gemma2", "gemma3_text", "gemma3_text_short_window", "phi3"}


def build_tiny(family: str, seed: int = 0):
    """A :class:`LoadedModel` of a tiny random ``family`` model, through the package's own preparation."""
    from transformers import AutoModelForCausalLM

    from explorer.core.models import prepare

    tokenizer = _tiny_tokenizer(with_bos=family in WITH_BOS)
    torch.manual_seed(seed)
    config = tiny_config(family, vocab=len(tokenizer))
    # Wider random weights than the usual 0.02, so the next-token distribution is peaked and restorations matter.
    config.initializer_range = 0.3
    config.bos_token_id, config.eos_token_id, config.pad_token_id = 0, 1, 2
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return prepare(f"tiny-{family}", model, tokenizer)


def save_tiny(folder: Path, family: str = "llama") -> Path:
    """A tiny random ``family`` model saved as a local model folder, for the real loader (CLI, app, policy)."""
    tiny = build_tiny(family)
    tiny.model.save_pretrained(folder)
    tiny.tokenizer.save_pretrained(folder)
    return folder


def run_cli(*args: str, one_thread: bool = False):
    """``python -m explorer ARGS`` as users run it; ``one_thread`` for tiny models on a busy machine."""
    import subprocess
    import sys

    env = {**os.environ, **({"OMP_NUM_THREADS": "1"} if one_thread else {})}
    return subprocess.run([sys.executable, "-m", "explorer", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@contextmanager
def one_torch_thread():
    """Tiny models run fastest on one torch thread: on a busy 2-core machine a second one only spins (10-40x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def one_thread():
    """The module's tests run on one torch thread (``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    with one_torch_thread():
        yield


def traced_scores(trace_output) -> dict:
    """The scores of an app trace (handler return value or `gradio_client` result), read back from its JSON download."""
    import json

    json_path = next(path for path in trace_output[5] if str(path).endswith(".json"))
    return json.loads(Path(json_path).read_text(encoding="utf-8"))["traces"]


@pytest.fixture(scope="session")
def default_model():
    """The embedded default model, loaded through the real loader and cache."""
    from explorer.core.models import load_model

    return load_model()


HOSTILE_MARKUP = "<img src=x onerror=alert(1)>"


def hostile_trace_result():
    """A made-up trace whose prompt, subject and answer are markup, for what shows and saves it."""
    from explorer.tracing import TraceResult

    rng = np.random.default_rng(0)
    return TraceResult(
        model="m", prompt=f"{HOSTILE_MARKUP} is in", subject=HOSTILE_MARKUP, subject_guessed=False,
        tokens=["<bos>", "<img", " src=x", " onerror=alert(1)>", " is", " in"], subject_range=(1, 4),
        answer=" </script>", answer_id=7, high_score=0.8, low_score=0.1,
        scores={k: rng.uniform(0.1, 0.8, (6, 3)) for k in ("hidden", "mlp", "attn")},
        noise=3.0, noise_std=3.09, samples=10, window=10, seed=1, seconds=1.5, num_layers=3,
    )
