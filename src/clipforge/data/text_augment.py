"""EDA text augmentation of training captions (Wei & Zou 2019), as CLIP's "improved baselines" use it
(Fini et al. 2023; methods.md section 12). ``data.text_augment = "eda"``.

A caption is lower-cased and reduced to its words (letters and spaces, as EDA does); with probability
``data.eda.p`` it is then changed by one operation drawn uniformly from ``data.eda.ops``:

    sr  synonym replacement: n distinct non-stop words, each replaced (every occurrence) by a synonym
    ri  random insertion:    n times, a synonym of a random non-stop word inserted at a random place
    rs  random swap:         n times, two random positions swapped
    rd  random deletion:     each word dropped with probability alpha
    sw  stop-word removal:   every stop word dropped (Fini et al.)

with n = max(1, int(alpha * words)). Every operation keeps at least one word. With
``data.eda.stop_words_p`` > 0, every stop word is first dropped with that probability (Fini et al.'s
released code: 0.8), unless the caption has nothing else; that step alone (``data.text_augment =
"stop_words"``) is their weak augmentation of the global caption. The draws come from the
``random.Random`` the caller passes (one per sample, from the sample's place in the data plan), so a
resumed run augments exactly as the first one did.

Synonyms come from WordNet 3.0's database files (``data.noun`` ... ``data.verb``), read directly:
Debian's ``wordnet-base`` package installs them in /usr/share/wordnet, NLTK's downloader in
``~/nltk_data/corpora/wordnet``. ``data.eda.synonyms`` may instead name a JSON file
``{"word": ["synonym", ...]}`` (a domain thesaurus), or be ``"none"`` (sr and ri then leave the
caption unchanged).
"""

from __future__ import annotations

import json
import os
import random
import re
from functools import lru_cache
from pathlib import Path

# A common English stop-word list (function words: articles, pronouns, prepositions, auxiliaries).
STOP_WORDS = frozenset("""
a about above after again against all am an and any are as at be because been before being below between
both but by can could did do does doing down during each few for from further had has have having he her
here hers herself him himself his how i if in into is it its itself just me more most my myself no nor not
now of off on once only or other our ours ourselves out over own same she should so some such than that
the their theirs them themselves then there these they this those through to too under until up very was
we were what when where which while who whom why will with would you your yours yourself yourselves
""".split())

WORDNET_FILES = ("data.noun", "data.verb", "data.adj", "data.adv")
OPS = ("sr", "ri", "rs", "rd", "sw")


def wordnet_dirs() -> list[Path]:
    """Where WordNet's database files are looked for, in order."""
    dirs = [os.environ.get("WORDNET_DIR"), "/usr/share/wordnet"]
    for root in [os.environ.get("NLTK_DATA"), "~/nltk_data", "/usr/share/nltk_data", "/usr/local/share/nltk_data",
                 "/usr/lib/nltk_data", "/usr/local/lib/nltk_data"]:
        if root:
            dirs.append(str(Path(root).expanduser() / "corpora" / "wordnet"))
    return [Path(d) for d in dirs if d]


def find_wordnet() -> Path | None:
    return next((d for d in wordnet_dirs() if all((d / f).is_file() for f in WORDNET_FILES)), None)


def missing_wordnet_message() -> str:
    return ("data.text_augment = 'eda' and data.text_views replace words by WordNet synonyms, and no WordNet "
            "database was found "
            f"(looked in {', '.join(str(d) for d in wordnet_dirs())}). Install it with `apt-get install "
            "wordnet-base` (Debian/Ubuntu) or `python -m nltk.downloader wordnet`, or set WORDNET_DIR to a "
            "directory with data.noun / data.verb / data.adj / data.adv; or give your own thesaurus with "
            "data.eda.synonyms = 'synonyms.json', or use swaps, deletions and stop-word removal only with "
            "data.eda.synonyms = 'none'")


@lru_cache(maxsize=4)
def read_wordnet(directory: str) -> dict[str, tuple[str, ...]]:
    """word -> its synonyms (the other lemmas of every synset it is in), from WordNet's data files."""
    synsets: dict[str, set[str]] = {}
    for name in WORDNET_FILES:
        with open(Path(directory) / name, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("  "):  # the licence header
                    continue
                # offset lex_filenum ss_type w_cnt(hex) word lex_id [word lex_id ...] ...
                fields = line.split()
                count = int(fields[3], 16)
                words = [_lemma(fields[4 + 2 * k]) for k in range(count)]
                words = [w for w in words if w]
                for w in words:
                    synsets.setdefault(w, set()).update(words)
    return {w: tuple(sorted(s - {w})) for w, s in synsets.items() if len(s) > 1}


def _lemma(raw: str) -> str:
    # "photograph", "ice_cream", "red(a)" -> words as they appear in a caption
    return " ".join(caption_words(re.sub(r"\(.*\)$", "", raw).replace("_", " ")))


def read_thesaurus(path: str) -> dict[str, tuple[str, ...]]:
    try:
        table = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"data.eda.synonyms = '{path}': cannot read it as a JSON thesaurus "
                         f"{{\"word\": [\"synonym\", ...]}} ({e})") from None
    if not isinstance(table, dict) or not all(isinstance(v, list) for v in table.values()):
        raise ValueError(f"data.eda.synonyms = '{path}' must be a JSON object mapping words to lists of synonyms")
    return {str(k).lower(): tuple(str(s).lower() for s in v if str(s).lower() != str(k).lower())
            for k, v in table.items()}


def load_synonyms(source: str) -> dict[str, tuple[str, ...]]:
    if source == "none":
        return {}
    if source == "wordnet":
        found = find_wordnet()
        if found is None:
            raise ValueError(missing_wordnet_message())
        return read_wordnet(str(found))
    return read_thesaurus(source)


def caption_words(text: str) -> list[str]:
    """EDA's clean-up: lower case, letters only, single spaces."""
    text = text.lower().replace("'", "").replace("-", " ").replace("\t", " ").replace("\n", " ")
    return re.sub(r"[^a-z ]+", " ", text).split()


class EDA:
    """One seeded EDA operation per caption (see the module docstring)."""

    def __init__(self, alpha: float = 0.1, p: float = 1.0, ops: tuple[str, ...] = ("sr", "ri", "rs", "rd"),
                 synonyms: str | dict[str, tuple[str, ...]] = "wordnet", stop_words_p: float = 0.0) -> None:
        unknown = [op for op in ops if op not in OPS]
        if unknown or not ops:
            raise ValueError(f"data.eda.ops: unknown operation(s) {unknown}; choose from {list(OPS)}")
        self.alpha, self.p, self.ops = float(alpha), float(p), tuple(ops)
        self.stop_words_p = float(stop_words_p)
        self.synonyms = load_synonyms(synonyms) if isinstance(synonyms, str) else synonyms

    def __call__(self, caption: str, rng: random.Random) -> str:
        words = caption_words(caption)
        if not words:
            return caption  # nothing EDA could keep; the caption as it was
        words = self.strip_stop_words(words, rng)
        # the draws are made whether or not the caption changes: one stream per sample, any p
        apply, op = rng.random() < self.p, self.ops[rng.randrange(len(self.ops))]
        if not apply:
            return " ".join(words)
        return " ".join(getattr(self, op)(words, rng) or [rng.choice(words)])

    def strip_stop_words(self, words: list[str], rng: random.Random) -> list[str]:
        """Every stop word dropped with probability ``stop_words_p`` (no draw at 0: streams as before)."""
        if self.stop_words_p == 0 or rng.random() >= self.stop_words_p:
            return words
        return [w for w in words if w not in STOP_WORDS] or words

    def weak(self, caption: str, rng: random.Random) -> str:
        """Fini et al.'s weak text augmentation: the clean-up and the stop-word step only."""
        words = caption_words(caption)
        return " ".join(self.strip_stop_words(words, rng)) if words else caption

    def n_changes(self, words: list[str]) -> int:
        return max(1, int(self.alpha * len(words)))

    def sr(self, words: list[str], rng: random.Random) -> list[str]:
        candidates = sorted({w for w in words if w not in STOP_WORDS and self.synonyms.get(w)})
        rng.shuffle(candidates)
        out = list(words)
        for word in candidates[: self.n_changes(words)]:
            synonym = rng.choice(self.synonyms[word])
            out = [synonym if w == word else w for w in out]
        return " ".join(out).split()  # a multi-word synonym becomes several words

    def ri(self, words: list[str], rng: random.Random) -> list[str]:
        out = list(words)
        for _ in range(self.n_changes(words)):
            choices = [w for w in out if w not in STOP_WORDS and self.synonyms.get(w)]
            if not choices:
                break
            synonym = rng.choice(self.synonyms[rng.choice(choices)])
            out.insert(rng.randrange(len(out) + 1), synonym)
        return " ".join(out).split()

    def rs(self, words: list[str], rng: random.Random) -> list[str]:
        out = list(words)
        if len(out) < 2:
            return out
        for _ in range(self.n_changes(words)):
            i, j = rng.sample(range(len(out)), 2)
            out[i], out[j] = out[j], out[i]
        return out

    def rd(self, words: list[str], rng: random.Random) -> list[str]:
        if len(words) == 1:
            return list(words)
        kept = [w for w in words if rng.random() >= self.alpha]
        return kept or [rng.choice(words)]

    def sw(self, words: list[str], rng: random.Random) -> list[str]:
        return [w for w in words if w not in STOP_WORDS] or [rng.choice(words)]
