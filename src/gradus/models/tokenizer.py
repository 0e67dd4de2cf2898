"""A character-level tokenizer for the tiny models, built locally with the `tokenizers` library.

Every byte of the UTF-8 text is one token, so every ASCII character is one token. Technically it is a
byte-level BPE with no merges: a `ByteLevel` pre-tokenizer maps each byte to one printable symbol, the
vocabulary holds all 256 symbols, and the `ByteLevel` decoder maps them back.

Why byte-level rather than a plain one-id-per-character vocabulary: transformers 5 loads the tokenizer
of a directory whose config.json says `model_type: qwen2` as `Qwen2Tokenizer`, whatever
tokenizer_config.json names, and that class keeps only the vocabulary and merges from tokenizer.json and
rebuilds its own pipeline (NFC, a split regex, ByteLevel, BPE without unk). A word-level character
vocabulary comes back from that with its spaces and newlines gone. A byte-level BPE with no merges and
the same NFC normalizer gives the same ids under both pipelines, for every input text, so a saved tiny
model loads with plain `AutoTokenizer.from_pretrained(dir)` unchanged.

Choices, and why:
1. Ids 0..3 are `<pad>`, `<s>` (bos), `</s>` (eos), `<unk>`; pad != eos so a padded position is never
   mistaken for the end of a completion. `<unk>` is never produced (every byte has an id); it exists
   because HF code expects an unk token.
2. Then the characters of `alphabet` (ASCII, default printable ASCII plus tab and newline), in order,
   then the remaining bytes. Vocabulary size is always 4 + 256 = 260.
3. No bos is added on encode: the ids of an ASCII text are exactly its characters, which keeps token
   lengths equal to character lengths. A caller who wants a bos prepends `tokenizer.bos_token_id`.
4. Text is NFC-normalised (as Qwen2Tokenizer does), so decode(encode(text)) == NFC(text): exactly text
   for ASCII and for any already-composed Unicode text.
5. No chat template: prompts for the tiny models are plain text. A literal special-token string in the
   text (e.g. "</s>") is matched as that special token, as with any HF tokenizer.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD_TOKEN = "<pad>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
UNK_TOKEN = "<unk>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN)

# Printable ASCII (space .. '~') plus tab and newline: 97 characters, given ids 4..100.
DEFAULT_ALPHABET: str = "\t\n" + "".join(chr(code) for code in range(32, 127))


def byte_symbols() -> dict[int, str]:
    """The byte -> printable-symbol table of the ByteLevel pre-tokenizer (GPT-2's bytes_to_unicode).

    Bytes that are printable Latin-1 characters stand for themselves; the other 68 are moved, in order,
    to the code points 256, 257, ... (so space is 'Ġ' = 256 + 32, newline 'Ċ').
    """
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    table: dict[int, str] = {}
    moved = 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + moved)
            moved += 1
    return table


def _check_alphabet(alphabet: str) -> None:
    """Reject alphabets that would give an ambiguous vocabulary order or need multi-byte tokens."""
    if not alphabet:
        raise ValueError("alphabet must contain at least one character")
    non_ascii = sorted({ch for ch in alphabet if ord(ch) > 127})
    if non_ascii:
        raise ValueError(f"alphabet must be ASCII (one byte per character), got {non_ascii!r}")
    seen: set[str] = set()
    duplicates = sorted({ch for ch in alphabet if ch in seen or seen.add(ch)})
    if duplicates:
        raise ValueError(f"alphabet has repeated characters: {duplicates!r}")


def build_char_tokenizer(alphabet: str | None = None) -> PreTrainedTokenizerFast:
    """Build the character (byte) level tokenizer described in the module docstring.

    `alphabet` lists the ASCII characters that get the ids right after the four specials, in order;
    None means `DEFAULT_ALPHABET`. All other bytes follow, so no input is ever unknown. The result saves
    with `save_pretrained` and loads back with plain `AutoTokenizer.from_pretrained(dir)` to the same ids,
    next to a Qwen2 or a Llama config.
    """
    alphabet = DEFAULT_ALPHABET if alphabet is None else alphabet
    _check_alphabet(alphabet)
    symbols = byte_symbols()
    first = [ord(ch) for ch in alphabet]
    order = first + [byte for byte in range(256) if byte not in set(first)]
    vocab = {token: index for index, token in enumerate([*SPECIAL_TOKENS, *(symbols[b] for b in order)])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False, byte_fallback=False))
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        # The default clean-up would delete spaces before punctuation and break the round trip.
        clean_up_tokenization_spaces=False,
    )
