"""Train the reference models' byte-level BPE tokenizer on the Gutenberg train split.

Usage::

    python training/train_tokenizer.py --out models/tokenizer [--vocab 8192] [--max-chars N]

The result loads with ``transformers.AutoTokenizer.from_pretrained(out)``. Deterministic for the
same data, vocabulary size and character budget (books are read in file order).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator
from pathlib import Path

from dynamic_moe_router.data import data_file, read_jsonl

EOS = "<|endoftext|>"
PAD = "<|pad|>"


def texts(max_chars: int) -> Iterator[str]:
    used = 0
    for record in read_jsonl(data_file("gutenberg/train.jsonl.xz")):
        text = record["text"]
        if used + len(text) > max_chars:
            text = text[: max_chars - used]
        used += len(text)
        yield text
        if used >= max_chars:
            return


def main() -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument(
        "--max-chars", type=int, default=10**12, help="character budget (default: the whole split)"
    )
    args = ap.parse_args()

    start = time.time()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=args.vocab,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts(args.max_chars), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=PAD)
    fast.model_max_length = 512
    fast.save_pretrained(args.out)
    print(f"tokenizer with {fast.vocab_size} tokens written to {args.out} in {time.time() - start:.0f}s")


if __name__ == "__main__":
    main()
