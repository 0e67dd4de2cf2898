"""A character-level tokenizer for the tiny models, built locally with the `tokenizers` library.

Each character of the alphabet is one token; the model is a `WordLevel` vocabulary behind a
pre-tokenizer that splits the text into single characters, and a `Fuse` decoder that joins them back
with nothing in between, so `decode(encode(text)) == text` for any text over the alphabet.

Choices, and why:
1. Ids 0..3 are the special tokens `<pad>`, `<s>` (bos), `</s>` (eos), `<unk>`; pad != eos so a padded
   position is never mistaken for the end of a completion.
2. No bos is added on encode: the ids of a text are exactly its characters, which keeps prompt and
   completion lengths in tokens equal to their lengths in characters (handy in tests and rewards).
   A caller who wants a bos prepends `tokenizer.bos_token_id` itself.
3. No chat template: prompts for the tiny models are plain text.
4. A character outside the alphabet encodes to `<unk>` (and so does not round-trip). A literal
   special-token string in the text (e.g. "</s>") is matched as that special token, as with any
   HF tokenizer.
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD_TOKEN = "<pad>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
UNK_TOKEN = "<unk>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN)

# Printable ASCII (space .. '~') plus tab and newline: 97 characters, so 101 ids with the specials.
DEFAULT_ALPHABET: str = "\t\n" + "".join(chr(code) for code in range(32, 127))


def _check_alphabet(alphabet: str) -> None:
    """Reject alphabets that would give an ambiguous or empty vocabulary."""
    if not alphabet:
        raise ValueError("alphabet must contain at least one character")
    seen: set[str] = set()
    duplicates = sorted({ch for ch in alphabet if ch in seen or seen.add(ch)})
    if duplicates:
        raise ValueError(f"alphabet has repeated characters: {duplicates!r}")


def build_char_tokenizer(alphabet: str | None = None) -> PreTrainedTokenizerFast:
    """Build a character-level tokenizer (see the module docstring for its conventions).

    `alphabet` lists the characters that get their own id, in id order after the four specials;
    None means `DEFAULT_ALPHABET`. The result saves with `save_pretrained` and loads back with plain
    `transformers.AutoTokenizer.from_pretrained(dir)` to the same ids.
    """
    alphabet = DEFAULT_ALPHABET if alphabet is None else alphabet
    _check_alphabet(alphabet)
    vocab = {token: index for index, token in enumerate([*SPECIAL_TOKENS, *alphabet])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    # "[\s\S]" matches any single character, newline included ("." would skip newlines).
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        # The default clean-up would delete spaces before punctuation and break the round trip.
        clean_up_tokenization_spaces=False,
    )
