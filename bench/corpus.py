"""Man-page corpus and labelled QA set for the answer-quality benchmark.

Corpus: the real man pages listed in bench/data/answers/documents.txt (one `name.section` a
line, e.g. `shred.1`), as installed on a Debian system under /usr/share/man. Each page is
rendered to plain text deterministically (man at a fixed width of 100 columns, no hyphenation
or justification, C.UTF-8 locale, overstrikes removed, blank-line runs collapsed), so the same
machine gives the same text every run.

Labels: bench/data/answers/questions.json — hand-written factoid questions, each tied to one
page, with a regex for the correct answer and a verbatim evidence snippet; plus unanswerable
questions (document, answer and evidence all null) that no page in the corpus answers.

    python bench/corpus.py --check

verifies the label file against the rendered corpus, prints every violation and exits 1 if
there is any; on success prints the counts.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data" / "answers"
DOCUMENTS_FILE = DATA_DIR / "documents.txt"
QUESTIONS_FILE = DATA_DIR / "questions.json"
MAN_ROOT = Path("/usr/share/man")
MANWIDTH = 100
RENDER_TIMEOUT_S = 60

MAX_PER_PAGE = 4
MIN_ANSWERABLE = 75
MIN_UNANSWERABLE = 20
MIN_PAGES_WITH_QUESTIONS = 25
EVIDENCE_MIN, EVIDENCE_MAX = 15, 200

_OVERSTRIKE = re.compile(r".\x08")
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_BLANK_RUNS = re.compile(r"\n(?:[ \t]*\n){2,}")


def _split_name(name: str) -> tuple[str, str]:
    page, dot, section = name.rpartition(".")
    if not dot or not page or not section:
        raise ValueError(f"man page name must be 'name.section' (e.g. 'shred.1'), got {name!r}")
    return page, section


def man_page_path(name: str) -> Path:
    """Path of the installed source of man page `name` ('shred.1'), compressed or not."""
    page, section = _split_name(name)
    directory = MAN_ROOT / f"man{section[0]}"
    for candidate in (directory / f"{page}.{section}.gz", directory / f"{page}.{section}"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"man page {name} not found (looked for {directory / f'{page}.{section}'}[.gz]); "
        "the answers bench needs the man pages installed (on Debian: the package providing the "
        "command, and no dpkg path-exclude for /usr/share/man)"
    )


def _normalise(text: str) -> str:
    text = _ANSI.sub("", text)
    while True:  # bold is "X\bX", underline "_\bX"; strip repeatedly for stacked overstrikes
        stripped = _OVERSTRIKE.sub("", text)
        if stripped == text:
            break
        text = stripped
    text = text.replace("\x08", "")
    lines = [line.rstrip() for line in text.expandtabs().split("\n")]
    text = "\n".join(lines)
    text = _BLANK_RUNS.sub("\n\n\n", text)
    return text.strip("\n") + "\n"


def render(name: str) -> str:
    """Man page `name` ('shred.1') as deterministic plain text."""
    path = man_page_path(name)
    env = {k: v for k, v in os.environ.items() if k not in ("MAN_KEEP_FORMATTING", "MANPAGER", "PAGER")}
    env.update(MANWIDTH=str(MANWIDTH), LC_ALL="C.UTF-8", MANPAGER="cat", PAGER="cat")
    try:
        proc = subprocess.run(
            ["man", "--no-hyphenation", "--no-justification", "-l", str(path)],
            env=env, capture_output=True, timeout=RENDER_TIMEOUT_S, check=False,
        )
    except FileNotFoundError as exc:
        raise RuntimeError("the answers bench needs `man` (package man-db) installed") from exc
    if proc.returncode != 0 or not proc.stdout.strip():
        raise RuntimeError(f"man failed on {path} (rc={proc.returncode}): "
                           f"{proc.stderr.decode('utf-8', 'replace').strip()}")
    return _normalise(proc.stdout.decode("utf-8", "replace"))


def document_names() -> list[str]:
    """Page names listed in documents.txt, in order (blank lines and # comments skipped)."""
    names = []
    for line in DOCUMENTS_FILE.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            names.append(line)
    return names


def load(names: list[str] | None = None) -> dict[str, str]:
    """name -> rendered text, for `names` or every page in documents.txt."""
    return {name: render(name) for name in (document_names() if names is None else names)}


def load_questions() -> list[dict]:
    return json.loads(QUESTIONS_FILE.read_text(encoding="utf-8"))


def _squash(text: str) -> str:
    return " ".join(text.split()).lower()


def check(questions: list[dict], documents: list[str], corpus: dict[str, str]) -> list[str]:
    """Every violation of the label constraints, as messages (empty when all hold)."""
    problems: list[str] = []
    squashed = {name: _squash(text) for name, text in corpus.items()}
    doc_set = set(documents)
    if len(doc_set) != len(documents):
        dupes = sorted(n for n, c in Counter(documents).items() if c > 1)
        problems.append(f"documents.txt lists pages more than once: {dupes}")

    ids = Counter(q.get("id") for q in questions)
    for qid, count in ids.items():
        if count > 1:
            problems.append(f"id {qid!r} used {count} times")

    per_page: Counter[str] = Counter()
    answerable = unanswerable = 0
    for q in questions:
        qid = q.get("id", "<no id>")
        question = q.get("question")
        if not isinstance(question, str) or not question.strip():
            problems.append(f"{qid}: empty or missing question")
            continue
        missing = {"id", "document", "question", "answer", "evidence"} - q.keys()
        if missing:
            problems.append(f"{qid}: missing keys {sorted(missing)}")
            continue
        doc, answer, evidence = q["document"], q["answer"], q["evidence"]
        if doc is None:
            if answer is not None or evidence is not None:
                problems.append(f"{qid}: unanswerable but answer/evidence not null")
            unanswerable += 1
            continue
        answerable += 1
        if doc not in doc_set:
            problems.append(f"{qid}: document {doc!r} not in documents.txt")
            continue
        per_page[doc] += 1
        if not isinstance(answer, str) or not isinstance(evidence, str):
            problems.append(f"{qid}: answer and evidence must be strings")
            continue
        try:
            pattern = re.compile(answer, re.IGNORECASE)
        except re.error as exc:
            problems.append(f"{qid}: answer regex {answer!r} does not compile: {exc}")
            continue
        if not EVIDENCE_MIN <= len(evidence) <= EVIDENCE_MAX:
            problems.append(f"{qid}: evidence is {len(evidence)} chars, "
                            f"want {EVIDENCE_MIN}-{EVIDENCE_MAX}")
        if not pattern.search(evidence):
            problems.append(f"{qid}: answer regex {answer!r} does not match its evidence")
        if pattern.search(question):
            problems.append(f"{qid}: answer regex {answer!r} matches the question itself")
        if doc in squashed and _squash(evidence) not in squashed[doc]:
            problems.append(f"{qid}: evidence not found verbatim in {doc}: {evidence!r}")

    for doc, count in sorted(per_page.items()):
        if count > MAX_PER_PAGE:
            problems.append(f"{doc}: {count} questions, at most {MAX_PER_PAGE} allowed")
    if answerable < MIN_ANSWERABLE:
        problems.append(f"{answerable} answerable questions, need >= {MIN_ANSWERABLE}")
    if unanswerable < MIN_UNANSWERABLE:
        problems.append(f"{unanswerable} unanswerable questions, need >= {MIN_UNANSWERABLE}")
    if len(per_page) < MIN_PAGES_WITH_QUESTIONS:
        problems.append(f"answerable questions cover {len(per_page)} pages, "
                        f"need >= {MIN_PAGES_WITH_QUESTIONS}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="verify questions.json against the rendered corpus")
    parser.add_argument("--dump", metavar="DIR", type=Path,
                        help="write each rendered page to DIR/<name>.txt")
    args = parser.parse_args(argv)
    if not (args.check or args.dump):
        parser.print_help()
        return 2

    documents = document_names()
    try:
        corpus = load(documents)
    except (FileNotFoundError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1

    if args.dump:
        args.dump.mkdir(parents=True, exist_ok=True)
        for name, text in corpus.items():
            (args.dump / f"{name}.txt").write_text(text, encoding="utf-8")

    if args.check:
        questions = load_questions()
        problems = check(questions, documents, corpus)
        for problem in problems:
            print(problem)
        if problems:
            print(f"FAILED: {len(problems)} violation(s)")
            return 1
        answerable = [q for q in questions if q.get("document") is not None]
        pages = Counter(q["document"] for q in answerable)
        chars = sum(len(t) for t in corpus.values())
        print(f"ok: {len(corpus)} pages ({chars} chars rendered), {len(answerable)} answerable "
              f"questions over {len(pages)} pages, {len(questions) - len(answerable)} unanswerable")
    return 0


if __name__ == "__main__":
    sys.exit(main())
