"""`hpctrain tokenizer train`: a byte-level BPE tokenizer (GPT-2 style) from local text files."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hpctrain.launcher.contract.errors import UserError, run_command

SPECIAL = ["<|endoftext|>", "<pad>"]


def train_tokenizer(inputs: list[str], out: str, vocab_size: int = 2000) -> str:
    """Train on `inputs`, save as a Hugging Face fast tokenizer (eos <|endoftext|>, pad <pad>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    missing = [p for p in inputs if not Path(p).is_file()]
    if missing:
        raise UserError("no such file", file=missing[0], expected="text files to train on")
    if vocab_size < 300:
        raise UserError(f"{vocab_size}", field="--vocab-size", expected=">= 300 (256 bytes + specials + merges)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train(inputs, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=SPECIAL[0], pad_token=SPECIAL[1])
    fast.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="hpctrain tokenizer train",
                                 description="train a byte-level BPE tokenizer on text files (HF format)")
    ap.add_argument("inputs", nargs="+")
    ap.add_argument("--out", required=True)
    ap.add_argument("--vocab-size", type=int, default=2000)
    args = ap.parse_args(argv)
    return run_command(lambda: print(f"tokenizer written to {train_tokenizer(args.inputs, args.out, args.vocab_size)}"))


if __name__ == "__main__":
    sys.exit(main())
