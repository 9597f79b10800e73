"""Contact sheets: a concept's photos with its mined boxes, then the crops, best first."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from personalkv.mining.miner import MinedConcept

THUMB = 256
CROP = 128
COLOURS = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
           (145, 30, 180), (70, 240, 240), (240, 50, 230)]


def render_sheet(photos: Sequence[np.ndarray], mined: MinedConcept, title: str = "", per_row: int = 6) -> Image.Image:
    thumbs = []
    for i, photo in enumerate(photos):
        im = Image.fromarray(photo)
        s = THUMB / max(im.size)
        im = im.resize((max(1, round(im.width * s)), max(1, round(im.height * s))))
        draw = ImageDraw.Draw(im)
        for rank, p in enumerate(mined.patches):
            if p.photo_index == i:
                box = [v * s for v in p.box]
                draw.rectangle(box, outline=COLOURS[rank % len(COLOURS)], width=3)
                draw.text((box[0] + 3, box[1] + 2), str(rank + 1), fill=COLOURS[rank % len(COLOURS)])
        thumbs.append(im)
    crops = []
    for rank, p in enumerate(mined.patches):
        x0, y0, x1, y1 = p.box
        crop = Image.fromarray(photos[p.photo_index][y0:y1, x0:x1]).resize((CROP, CROP))
        ImageDraw.Draw(crop).text((3, 2), f"{rank + 1}: {p.score:.2f}", fill=(255, 255, 0))
        crops.append(crop)
    n_rows_t = -(-len(thumbs) // per_row)
    crops_per_row = per_row * THUMB // CROP
    n_rows_c = -(-len(crops) // crops_per_row)
    sheet = Image.new("RGB", (per_row * THUMB, 20 + n_rows_t * THUMB + n_rows_c * CROP), (30, 30, 30))
    ImageDraw.Draw(sheet).text((4, 4), title or mined.concept_id, fill=(255, 255, 255))
    for i, t in enumerate(thumbs):
        sheet.paste(t, ((i % per_row) * THUMB, 20 + (i // per_row) * THUMB))
    top = 20 + n_rows_t * THUMB
    for i, c in enumerate(crops):
        sheet.paste(c, ((i % crops_per_row) * CROP, top + (i // crops_per_row) * CROP))
    return sheet


def write_sheet(path: Path, photos: Sequence[np.ndarray], mined: MinedConcept, title: str = "") -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    render_sheet(photos, mined, title).save(path)
    return path
