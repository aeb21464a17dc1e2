"""A tiny BERT WordPiece tokenizer built from a vocabulary the tests write themselves, and a tiny random BERT saved
with it: the streamed-pass, CLI and fuzz tests need a real tokenizer on real text, not the MiniLM package.

The vocabulary (about 1800 tokens): the BERT special tokens, every printable ASCII character and its ``##``
continuation (so any ASCII word splits into known pieces instead of one [UNK]), a few common suffixes, a few
hundred frequent English words (the words of film reviews, questions and entailment pairs among them), and every
pair of lower-case letters as a word start and as a ``##`` continuation; lower-cased like MiniLM's. Rare words
become letter pairs, so sentences tokenise into more pieces than with MiniLM's 30522 entries.
"""
from __future__ import annotations

import string
from pathlib import Path

import torch

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
SUFFIXES = ["##s", "##es", "##ed", "##ing", "##ly", "##er", "##est", "##ness", "##ful", "##less", "##ment", "##tion",
            "##able", "##ity", "##ive", "##al", "##ous", "##ic", "##ist", "##ism", "##en", "##y", "##ies"]
WORDS = """
the a an and or but if then than so as of to in on at by for with from about into over after before under between
through during without within against among up down out off again further once here there when where why how all any
both each few more most other some such no nor not only own same too very can will just don should now is are was
were be been being have has had having do does did doing i me my we our you your he him his she her it its they them
their what which who whom this that these those am would could might must shall may also even still yet ever never
film films movie movies story stories plot character characters actor actors acting performance performances cast
director script scene scenes screen audience comedy drama action thriller horror romance music work works life love
time times world year years way ways people man men woman women child children family friend friends day days
good great best better bad worse worst fine funny dull boring slow fast thin fresh smart clever beautiful ugly
interesting entertaining enjoyable moving touching charming original predictable silly stupid brilliant wonderful
terrible awful perfect perfectly poor strong weak long short little big small new old young real true false whole
one two three first last many much well really quite rather too enough almost nothing something everything anything
make makes made making see seen saw watch watched watching feel feels felt find found give gives take takes get gets
got go goes going come comes came know think thought say said says look looks like likes want tell told seem seems
become becomes leave left right hard easy high low full empty half own kind sort lot lots bit part end new
year said company government president state states city country new york united american would percent million
question answer answers passage premise hypothesis true entailment contradiction neutral cause effect because
while although however therefore yes did does not was who what where which sentence word words text
""".split()


def vocabulary() -> list[str]:
    """The tokens, in id order: specials, characters, continuations, suffixes, words (first occurrence kept)."""
    chars = [c for c in string.printable if not c.isspace() and not c.isupper()]
    pairs = [a + b for a in string.ascii_lowercase for b in string.ascii_lowercase]
    tokens = (SPECIALS + chars + ["##" + c for c in chars if c.isalnum()] + SUFFIXES + WORDS + pairs
              + ["##" + p for p in pairs])
    return list(dict.fromkeys(tokens))


def write_vocab(folder: Path) -> Path:
    """``folder``/vocab.txt, one token a line (the id is the line number)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "vocab.txt"
    path.write_text("\n".join(vocabulary()) + "\n")
    return path


def make_tiny_tokenizer(folder: Path, model_max_length: int = 128):
    """A lower-casing BERT WordPiece tokenizer of the tiny vocabulary (written to ``folder``/vocab.txt)."""
    from transformers import BertTokenizer  # the fast (tokenizers) implementation in transformers >= 5

    vocab = write_vocab(folder)
    try:
        tok = BertTokenizer(vocab=str(vocab), do_lower_case=True, model_max_length=model_max_length)
    except TypeError:  # transformers 4: the fast tokenizer takes vocab_file
        from transformers import BertTokenizerFast

        tok = BertTokenizerFast(vocab_file=str(vocab), do_lower_case=True, model_max_length=model_max_length)
    if len(tok) != len(vocabulary()):
        raise RuntimeError(f"tiny tokenizer has {len(tok)} tokens, its vocab.txt {len(vocabulary())}")
    return tok


def save_tiny_bert(path: Path, hidden: int = 16, layers: int = 3, seed: int = 0) -> str:
    """A tiny random BERT (vocabulary = the tiny tokenizer's) saved with that tokenizer as a local model dir."""
    from transformers import BertConfig, BertForSequenceClassification

    path = Path(path)
    tok = make_tiny_tokenizer(path.parent / f"{path.name}-vocab")
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                     intermediate_size=2 * hidden, max_position_embeddings=128, pad_token_id=tok.pad_token_id)
    BertForSequenceClassification(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)
