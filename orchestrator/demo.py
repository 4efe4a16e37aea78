"""Demo assets built locally, with no network: a tiny random model, its tokenizer, a chat data set.

    python -m orchestrator.demo --out .demo          # what ``orchestrate demo prepare`` calls
    python -m orchestrator.demo --out d --arch gemma --shape prompt_completion

Layout of ``DIR``::

    model/                 tiny random model (safetensors) + tokenizer with a chat template
    data/train_dataset.json   rows of the chosen shape (default: chat {"messages": [system, user, assistant]}),
    data/test_dataset.json    JSON lines
    .demo-complete         written last; its presence means the assets are complete

Architectures (:data:`ARCHS`, issue 16.5): ``llama`` (the default), ``qwen2`` (alias ``qwen``), ``qwen3``,
``mistral`` (a 16-token sliding window, shorter than most rows), ``gemma`` (tied embeddings), ``gemma2``
(tied, attention logit soft-capping and a sliding window) and ``phi3`` (fused qkv and gate/up projections).
All share one locally trained tokenizer; every architecture but the default Llama gets ``pad = eos`` saved
with it, because transformers 5 otherwise adds the pad token some tokenizer classes define (Qwen2's
``<|endoftext|>``) as a token the embeddings do not have.

Data shapes (:data:`SHAPES`, TRL's, issue 16.6): ``messages``, ``prompt_completion`` (plain strings),
``conversational_prompt_completion`` and ``text``, all from the same conversations.

The conversations have learnable structure (the assistant reverses, repeats or counts the
user's words, or adds two numbers), so the loss falls clearly within ~40 steps.
Everything is seeded: two builds give the same files. Importing this module is cheap:
torch, transformers and tokenizers are imported inside the functions only.
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
from pathlib import Path

DEMO_VERSION = 1
MARKER = ".demo-complete"
MODEL_DIR = "model"
DATA_DIR = "data"
TRAIN_FILE = "train_dataset.json"
TEST_FILE = "test_dataset.json"

N_TRAIN = 400
N_TEST = 40
VOCAB_SIZE = 640
MODEL_SHAPE = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
)
# name -> (transformers model_type, config keys beyond MODEL_SHAPE). head_dim 16 = hidden / heads everywhere.
ARCHS: dict[str, tuple[str, dict]] = {
    "llama": ("llama", {"tie_word_embeddings": False}),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {"head_dim": 16}),
    "mistral": ("mistral", {"sliding_window": 16}),
    "gemma": ("gemma", {"head_dim": 16, "tie_word_embeddings": True}),
    "gemma2": ("gemma2", {"head_dim": 16, "sliding_window": 16, "tie_word_embeddings": True}),
    "phi3": ("phi3", {}),
}
ARCH_ALIASES = {"qwen": "qwen2", "gemma-tied": "gemma", "phi-3": "phi3"}
SHAPES = ("messages", "prompt_completion", "conversational_prompt_completion", "text")
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
# Zephyr/TinyLlama-style template: "<|role|>\n content eos" per message.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SYSTEM_PROMPT = "You are a tiny assistant that plays word games."
WORDS = [
    "red", "blue", "green", "cat", "dog", "sun", "moon", "tree", "fish", "bird", "star", "rock",
    "milk", "rain", "snow", "wind", "fire", "lake", "hill", "road", "book", "door", "lamp", "cup",
]
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def _conversation(rng: random.Random) -> dict:
    task = rng.choice(["reverse", "repeat", "count", "add"])
    if task == "add":
        a, b = rng.randint(0, 49), rng.randint(0, 49)
        user, answer = f"add {a} and {b}", f"{a} plus {b} is {a + b}"
    else:
        words = [rng.choice(WORDS) for _ in range(rng.randint(2, 6))]
        user = f"{task}: {' '.join(words)}"
        if task == "reverse":
            answer = " ".join(reversed(words))
        elif task == "repeat":
            answer = " ".join(words)
        else:
            answer = f"{NUMBER_WORDS[len(words)]} words"
    return {"messages": [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": user},
        {"role": "assistant", "content": answer},
    ]}


def make_rows(n: int, seed: int, shape: str = "messages") -> list[dict]:
    """``n`` deterministic conversations, as rows of ``shape`` (one of :data:`SHAPES`)."""
    rng = random.Random(seed)
    return [as_shape(_conversation(rng), shape) for _ in range(n)]


def as_shape(row: dict, shape: str) -> dict:
    """A ``{"messages": [system, user, assistant]}`` row in another of TRL's shapes."""
    system, user, assistant = row["messages"]
    prompt_text = f"{system['content']}\nUser: {user['content']}\nAssistant:"
    if shape == "messages":
        return row
    if shape == "prompt_completion":
        return {"prompt": prompt_text, "completion": " " + assistant["content"]}
    if shape == "conversational_prompt_completion":
        return {"prompt": [system, user], "completion": [assistant]}
    if shape == "text":
        return {"text": f"{prompt_text} {assistant['content']}"}
    raise ValueError(f"unknown data shape {shape!r}; expected one of {', '.join(SHAPES)}")


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row, sort_keys=True) + "\n")


def _build_tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        additional_special_tokens=SPECIAL_TOKENS[3:],
    )
    # No pad token on purpose: like many base models, the worker sets pad = eos.
    hf_tok.chat_template = CHAT_TEMPLATE
    return hf_tok


def model_config(arch: str, tokenizer):
    """The tiny random config of ``arch`` (:data:`ARCHS`) for ``tokenizer``."""
    from transformers import AutoConfig

    model_type, extra = ARCHS[ARCH_ALIASES.get(arch, arch)]
    return AutoConfig.for_model(
        model_type, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=None, **{**MODEL_SHAPE, **extra})


def _build_model(tokenizer, out: Path, arch: str = "llama") -> None:
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(model_config(arch, tokenizer))
    model.save_pretrained(out)


def _kind(arch: str, shape: str) -> dict:
    """What the marker records beyond the version (nothing for the default Llama chat demo)."""
    arch = ARCH_ALIASES.get(arch, arch)
    return {} if (arch, shape) == ("llama", "messages") else {"arch": arch, "shape": shape}


def is_complete(out: Path, arch: str = "llama", shape: str = "messages") -> bool:
    """True when ``out`` holds a complete build of this version of the assets, of this architecture and shape."""
    try:
        marker = json.loads((Path(out) / MARKER).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(marker, dict) or marker.get("version") != DEMO_VERSION:
        return False
    return {k: marker.get(k) for k in ("arch", "shape") if k in marker} == _kind(arch, shape)


def prepare_demo(out: Path, force: bool = False, arch: str = "llama", shape: str = "messages") -> Path:
    """Build the demo assets into ``out`` (idempotent) and return ``out`` as an absolute path.

    ``arch`` is one of :data:`ARCHS` (or an alias), ``shape`` one of :data:`SHAPES`: the test matrix's
    "assets for architecture X and data shape Y". The default is the Llama chat demo of ``make demo``.
    """
    if ARCH_ALIASES.get(arch, arch) not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {', '.join([*ARCHS, *ARCH_ALIASES])}")
    if shape not in SHAPES:
        raise ValueError(f"unknown data shape {shape!r}; expected one of {', '.join(SHAPES)}")
    out = Path(out).expanduser().absolute()
    if not force and is_complete(out, arch, shape):
        return out
    (out / MARKER).unlink(missing_ok=True)
    for sub in (MODEL_DIR, DATA_DIR):
        shutil.rmtree(out / sub, ignore_errors=True)
    (out / MODEL_DIR).mkdir(parents=True)
    (out / DATA_DIR).mkdir(parents=True)

    chats = make_rows(N_TRAIN, seed=1)
    _write_jsonl(out / DATA_DIR / TRAIN_FILE, [as_shape(r, shape) for r in chats])
    _write_jsonl(out / DATA_DIR / TEST_FILE, make_rows(N_TEST, seed=2, shape=shape))

    texts = [m["content"] for row in chats for m in row["messages"]]
    tokenizer = _build_tokenizer(texts)
    if _kind(arch, "messages"):
        tokenizer.pad_token = tokenizer.eos_token   # see the module docstring (an added pad token)
    tokenizer.save_pretrained(out / MODEL_DIR)
    _build_model(tokenizer, out / MODEL_DIR, arch)

    marker = {"version": DEMO_VERSION, "train_rows": N_TRAIN, "test_rows": N_TEST, **_kind(arch, shape)}
    (out / MARKER).write_text(json.dumps(marker, sort_keys=True) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestrator.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=".demo", help="where to build the assets (default: .demo)")
    parser.add_argument("--force", action="store_true", help="rebuild even if complete")
    parser.add_argument("--arch", default="llama", choices=[*ARCHS, *ARCH_ALIASES], help="model architecture")
    parser.add_argument("--shape", default="messages", choices=SHAPES, help="data shape (TRL's)")
    args = parser.parse_args(argv)
    out = prepare_demo(Path(args.out), force=args.force, arch=args.arch, shape=args.shape)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
