"""Demo assets built locally, with no network: a tiny random Llama, its tokenizer, a chat data set.

    python -m orchestrator.demo --out .demo          # what ``orchestrate demo prepare`` calls

Layout of ``DIR``::

    model/                 tiny LlamaForCausalLM (safetensors) + tokenizer with a chat template
    data/train_dataset.json   chat rows {"messages": [system, user, assistant]}, JSON lines
    data/test_dataset.json
    .demo-complete         written last; its presence means the assets are complete

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


def make_rows(n: int, seed: int) -> list[dict]:
    """``n`` deterministic conversations."""
    rng = random.Random(seed)
    return [_conversation(rng) for _ in range(n)]


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


def _build_model(tokenizer, out: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=None, tie_word_embeddings=False,
        **MODEL_SHAPE,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out)


def is_complete(out: Path) -> bool:
    """True when ``out`` holds a complete build of this version of the assets."""
    try:
        return json.loads((Path(out) / MARKER).read_text()).get("version") == DEMO_VERSION
    except (OSError, ValueError, AttributeError):
        return False


def prepare_demo(out: Path, force: bool = False) -> Path:
    """Build the demo assets into ``out`` (idempotent) and return ``out`` as an absolute path."""
    out = Path(out).expanduser().absolute()
    if not force and is_complete(out):
        return out
    (out / MARKER).unlink(missing_ok=True)
    for sub in (MODEL_DIR, DATA_DIR):
        shutil.rmtree(out / sub, ignore_errors=True)
    (out / MODEL_DIR).mkdir(parents=True)
    (out / DATA_DIR).mkdir(parents=True)

    train_rows, test_rows = make_rows(N_TRAIN, seed=1), make_rows(N_TEST, seed=2)
    _write_jsonl(out / DATA_DIR / TRAIN_FILE, train_rows)
    _write_jsonl(out / DATA_DIR / TEST_FILE, test_rows)

    texts = [m["content"] for row in train_rows for m in row["messages"]]
    tokenizer = _build_tokenizer(texts)
    tokenizer.save_pretrained(out / MODEL_DIR)
    _build_model(tokenizer, out / MODEL_DIR)

    marker = {"version": DEMO_VERSION, "train_rows": N_TRAIN, "test_rows": N_TEST}
    (out / MARKER).write_text(json.dumps(marker, sort_keys=True) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestrator.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=".demo", help="where to build the assets (default: .demo)")
    parser.add_argument("--force", action="store_true", help="rebuild even if complete")
    args = parser.parse_args(argv)
    out = prepare_demo(Path(args.out), force=args.force)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
