"""Looking at a dataset's files without decoding them: which cannot be read (``data.verify``), and the typical
size of its images (a training tool warns when it trains at a very different size).

Both work on a classification source (``LabelledImages``: ``open(index)``/``describe(index)``, files or records
in an archive alike) and on any dataset with ``samples``: a list of (path, ...) entries whose ``str``/``Path`` items
are files (a segmentation set's (image, mask)).
"""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import Iterable, List, Mapping, Optional, Tuple

from PIL import Image
from tqdm import tqdm

from .errors import UnreadableImageError

__all__ = ["sample_files", "unreadable_files", "verify_datasets", "typical_image_size"]

SHOWN = 20  # unreadable files listed in an error (all are counted)


def sample_files(dataset) -> List[str]:
    """Every file a dataset's samples name, in sample order."""
    samples = getattr(dataset, "samples", None)
    if samples is None:
        raise TypeError(f"{type(dataset).__name__} has no .samples list of file paths to check")
    return [str(item) for entry in samples for item in (entry if isinstance(entry, (tuple, list)) else (entry,))
            if isinstance(item, (str, Path))]


def _check(path_or_open) -> Optional[str]:
    """None when PIL reads the image's header and structure (``Image.verify``: no pixel decoding), else why not.
    ``path_or_open``: a file path or a callable opening the image."""
    try:
        with (path_or_open() if callable(path_or_open) else Image.open(path_or_open)) as img:
            img.verify()
    except Exception as e:  # PIL raises several types (OSError, SyntaxError, ValueError, DecompressionBomb)
        return f"{type(e).__name__}: {e}"
    return None


def unreadable_files(files: Iterable[str], progress: bool = False, desc: str = "verify") -> List[Tuple[str, str]]:
    """(path, reason) of each file PIL cannot open."""
    files = list(files)
    return [(p, why) for p in tqdm(files, desc=desc, leave=False, disable=not progress) if (why := _check(p))]


def verify_datasets(datasets: Mapping[str, object], progress: bool = False) -> int:
    """Check every file of every named dataset (``{"train": ..., "val": ...}``); raise one
    ``UnreadableImageError`` listing all unreadable files, so a bad file costs no epoch. Returns the files read."""
    bad: List[Tuple[str, str, str]] = []
    total = 0
    for name, dataset in datasets.items():
        if hasattr(dataset, "open") and hasattr(dataset, "describe"):  # a classification source: files or records
            total += len(dataset)
            bad += [(name, dataset.describe(i), why) for i in tqdm(range(len(dataset)), desc=f"verify {name}",
                                                                   leave=False, disable=not progress)
                    if (why := _check(lambda i=i: dataset.open(i)))]
            continue
        files = sample_files(dataset)
        total += len(files)
        bad += [(name, p, why) for p, why in unreadable_files(files, progress, desc=f"verify {name}")]
    if bad:
        lines = [f"  [{name}] {p}: {why}" for name, p, why in bad[:SHOWN]]
        more = f"\n  ... and {len(bad) - SHOWN} more" if len(bad) > SHOWN else ""
        raise UnreadableImageError(
            f"data.verify: {len(bad)} of {total} files cannot be read:\n" + "\n".join(lines) + more
            + "\nremove or replace them (each split's files are listed above), then start again")
    return total


def typical_image_size(dataset, n: int = 32) -> Optional[int]:
    """Median shorter side (pixels) of the first image of up to ``n`` evenly spaced samples (headers only);
    None when none can be read."""
    if hasattr(dataset, "open"):
        count, opener = len(dataset), dataset.open
    else:
        samples = getattr(dataset, "samples", None) or []
        count = len(samples)

        def opener(i: int) -> Image.Image:
            return Image.open(samples[i][0] if isinstance(samples[i], (tuple, list)) else samples[i])
    if not count:
        return None
    step = max(count // n, 1)
    sides = []
    for index in range(0, count, step)[:n]:
        try:
            with opener(index) as img:
                sides.append(min(img.size))
        except Exception:  # an unreadable file is the loader's (or data.verify's) to report
            continue
    return int(statistics.median(sides)) if sides else None
