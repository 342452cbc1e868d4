"""Build the shipped offline tasks from the `task` slice of the Python docs (files [89, 98), faq/*).

That slice is disjoint from calibration (tutorial/*), evaluation (reference/*) and the fixture model's
training text (see corpus.py), so no model birdbone ships or calibrates on has seen it.

    python -m birdbone_core.data.build_tasks ../shared/data/python-docs-3.11.txt.gz

Two tasks, both written as jsonl beside their lm-eval YAML in birdbone_core/data/tasks/:

* pydocs_lastword (LAMBADA-style): a passage of a prose paragraph cut right before a content word; the
  model must produce that word greedily (lm-eval `loglikelihood`, metric acc = is_greedy). As in
  LAMBADA, only words that already occur earlier in the passage are targets, so the word is recoverable
  from context (one per sentence: the sentence's last word when eligible, else its last eligible word). Chance (uniform over a vocabulary) is ~0; the builder also reports a trivial baseline:
  guessing the most frequent earlier word of >= 3 letters.
* pydocs_cloze (multiple choice, 4 options): one content word of a sentence is blanked; the options are
  the true word and three distractors drawn (fixed seed) from the slice's own content words of similar
  length that do not occur in the passage. Each option is scored as `word + rest of sentence` after the
  preceding text. Chance = 25%.

Everything is deterministic (fixed seed, sorted iteration), so a rebuild reproduces the committed bytes.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import random
import re
import sys
from collections import Counter
from pathlib import Path

from birdbone_core.data.corpus import SLICES, split_corpus

SEED = 0
OUT = Path(__file__).parent / "tasks"
MAX_LASTWORD_WORDS = 120  # context cap, words (keeps Gemma 3 270M runs to minutes)
MAX_CLOZE = 600

_ROLE = re.compile(r":[a-z:+-]+:`!?~?([^`<]*?)(?:\s*<[^`>]*>)?`")    # :func:`foo <x>` -> foo
_LINK = re.compile(r"`([^`<]+?)\s*<[^`>]*>`_{1,2}")                 # `text <url>`_ -> text
_LITERAL = re.compile(r"``([^`]+)``")
_EMPH = re.compile(r"(?<![\w*])\*{1,2}([^*]+?)\*{1,2}(?![\w*])")
_REF = re.compile(r"`([^`]+)`_{0,2}")
_WORD = re.compile(r"^[A-Za-z]+$")
_SENT = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
STOP = frozenset("""a an the and or but if then else of to in on at by for with from as is are was were be been
being it its this that these those there here which who whom whose what when where why how not no can
could would should will shall may might must do does did done has have had having you your we our they
their them he she his her i me my so such than too very also just only more most some any all each other
into out up down over under about after before again once same own both few many much one two use used
using see also even like well make""".split())


def clean_inline(text: str) -> str:
    """reStructuredText inline markup -> plain text (roles, links, literals, emphasis)."""
    text = _ROLE.sub(r"\1", text)
    text = _LINK.sub(r"\1", text)
    text = _LITERAL.sub(r"\1", text)
    text = _EMPH.sub(r"\1", text)
    text = _REF.sub(r"\1", text)
    return re.sub(r"\s+", " ", text).strip()


def prose_paragraphs(body: str) -> list[str]:
    """Unindented prose paragraphs of one rst file: no headings, directives, code or lists."""
    out = []
    for block in re.split(r"\n\s*\n", body):
        lines = [ln for ln in block.split("\n") if ln.strip()]
        if not lines or any(ln.startswith((" ", "\t")) for ln in lines):
            continue                                   # code, quotes, directive bodies
        if any(re.fullmatch(r"([=\-~^*#+\"'`])\1{2,}", ln.strip()) for ln in lines):
            continue                                   # headings
        first = lines[0].lstrip()
        if first.startswith(("..", "* ", "- ", "+ ", "|", ">>>", "#")) or re.match(r"^\d+[.)] ", first):
            continue                                   # directives, lists, tables, code
        text = clean_inline(" ".join(ln.strip() for ln in lines))
        if text.endswith("::"):                        # "for example::" introduces code: one colon
            text = text[:-1]
        words = text.split()
        alpha = sum(1 for w in words if _WORD.match(w.strip(".,;:()'\"?!")))
        if len(words) >= 12 and alpha / len(words) >= 0.75 and text[-1] in ".!?:":
            out.append(text)
    return out


def task_paragraphs(corpus_text: str) -> list[str]:
    files = split_corpus(corpus_text)
    if len(files) != 497:
        raise SystemExit(f"expected 497 files in the corpus, found {len(files)}")
    paras = []
    for lo, hi in SLICES["task"]:
        for _path, body in files[lo:hi]:
            paras.extend(prose_paragraphs(body))
    return paras


def _bare(w: str) -> str:
    return w.strip(".,;:()'\"?!").lower()


def build_lastword(paras: list[str]) -> tuple[list[dict], float]:
    """LAMBADA-style docs: the passage is cut right after a content word that already occurred earlier
    in it; the model must produce that word. One doc per sentence: its final word if eligible (as in
    LAMBADA), else its last eligible word. Context = the preceding text of the paragraph (up to
    MAX_LASTWORD_WORDS words, starting at a sentence boundary), at least 15 words. Also returns the
    accuracy of the trivial 'most frequent earlier word' baseline."""
    docs, baseline_hits = [], 0
    for p in paras:
        sents = _SENT.split(p)
        for i, sent in enumerate(sents):
            k = i                                   # earliest sentence that keeps the context short
            while k > 0 and len(" ".join(sents[k - 1:i + 1]).split()) <= MAX_LASTWORD_WORDS:
                k -= 1
            before = " ".join(sents[k:i]).split()
            words = sent.split()
            for j in range(len(words) - 1, -1, -1):
                w = words[j].rstrip(".!?") if j == len(words) - 1 else words[j]
                ctx_words = before + words[:j]
                earlier = [_bare(x) for x in ctx_words]
                if (_WORD.match(w) and len(w) >= 4 and w.lower() not in STOP and len(ctx_words) >= 15
                        and w.lower() in earlier):
                    break
            else:
                continue
            docs.append({"context": " ".join(ctx_words), "target": w})
            counts = Counter(x for x in earlier if len(x) >= 3 and x not in STOP and _WORD.match(x))
            guess = counts.most_common(1)[0][0] if counts else ""
            baseline_hits += guess == w.lower()
    return docs, baseline_hits / max(1, len(docs))


def build_cloze(paras: list[str], rng: random.Random) -> list[dict]:
    vocab = Counter(_bare(w) for p in paras for w in p.split())
    pool = sorted(w for w, c in vocab.items()
                  if _WORD.match(w) and len(w) >= 4 and w not in STOP and c >= 2)
    docs = []
    for p in paras:
        sents = _SENT.split(p)
        for i, s in enumerate(sents):
            words = s.split()
            if len(words) < 8:
                continue
            # blank a content word in the second half of the sentence (left context to work with)
            cands = [j for j in range(len(words) // 2, len(words))
                     if _WORD.match(words[j]) and len(words[j]) >= 4 and words[j].lower() in pool]
            if not cands:
                continue
            j = rng.choice(cands)
            word = words[j]
            passage = {_bare(w) for w in p.split()}
            near = [w for w in pool if abs(len(w) - len(word)) <= 2 and w not in passage]
            if len(near) < 3:
                continue
            distractors = rng.sample(near, 3)
            if word[0].isupper():
                distractors = [d.capitalize() for d in distractors]
            choices = [word] + distractors
            rng.shuffle(choices)
            prefix = " ".join(sents[max(0, i - 1):i] + [" ".join(words[:j])]).strip()
            rest = " ".join(words[j + 1:])
            tail = (" " + rest) if rest else ""
            docs.append({"context": prefix, "choices": choices, "options": [c + tail for c in choices],
                         "label": choices.index(word)})
    rng.shuffle(docs)
    return docs[:MAX_CLOZE]


def write_jsonl(path: Path, docs: list[dict]) -> str:
    data = "".join(json.dumps(d, ensure_ascii=False, sort_keys=True) + "\n" for d in docs).encode("utf-8")
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def main(argv: list[str]) -> None:
    src = Path(argv[0]) if argv else Path("../shared/data/python-docs-3.11.txt.gz")
    paras = task_paragraphs(gzip.open(src, "rt", encoding="utf-8").read())
    rng = random.Random(SEED)
    lastword, baseline = build_lastword(paras)
    cloze = build_cloze(paras, rng)
    OUT.mkdir(exist_ok=True)
    for name, docs in (("pydocs_lastword", lastword), ("pydocs_cloze", cloze)):
        digest = write_jsonl(OUT / f"{name}.jsonl", docs)
        print(f"{name}: {len(docs)} docs, sha256 {digest}")
    print(f"{len(paras)} prose paragraphs; lastword 'most frequent earlier word' baseline: {baseline:.1%}")


if __name__ == "__main__":
    main(sys.argv[1:])
