"""Reader for evaluation datasets in the shared format:

    <dataset>/concepts/<concept_id>/profile.json   {"name", "category", "info"}
    <dataset>/concepts/<concept_id>/train/*.jpg    photos the user uploads
    <dataset>/concepts/<concept_id>/test/*.jpg     other photos of the concept (optional)
    <dataset>/negatives/*.jpg                      photos of none of the concepts (optional)
    <dataset>/questions.jsonl                      questions (optional)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

PHOTO_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}


@dataclass(frozen=True)
class DatasetConcept:
    concept_id: str
    name: str
    category: str
    info: str
    train: tuple[Path, ...]
    test: tuple[Path, ...]


@dataclass(frozen=True)
class Dataset:
    root: Path
    concepts: tuple[DatasetConcept, ...]
    negatives: tuple[Path, ...]
    questions: tuple[dict, ...] = field(default=())

    def concept(self, concept_id: str) -> DatasetConcept:
        return next(c for c in self.concepts if c.concept_id == concept_id)


def _photos(folder: Path) -> tuple[Path, ...]:
    if not folder.is_dir():
        return ()
    return tuple(sorted(p for p in folder.iterdir() if p.suffix.lower() in PHOTO_SUFFIXES))


def load_dataset(root: str | Path) -> Dataset:
    root = Path(root)
    cdir = root / "concepts"
    if not cdir.is_dir():
        raise FileNotFoundError(f"{root} has no concepts/ folder (see the dataset format)")
    concepts = []
    for folder in sorted(p for p in cdir.iterdir() if p.is_dir()):
        prof_path = folder / "profile.json"
        prof = json.loads(prof_path.read_text()) if prof_path.exists() else {}
        concepts.append(DatasetConcept(
            concept_id=folder.name,
            name=str(prof.get("name") or folder.name),
            category=str(prof.get("category") or ""),
            info=str(prof.get("info") or ""),
            train=_photos(folder / "train"),
            test=_photos(folder / "test"),
        ))
    questions = ()
    qpath = root / "questions.jsonl"
    if qpath.exists():
        questions = tuple(json.loads(line) for line in qpath.read_text().splitlines() if line.strip())
    return Dataset(root, tuple(concepts), _photos(root / "negatives"), questions)
