"""Video segmentation data: clips of frames with sparse labels, and the iterator that feeds parallel streams.

A video dataset is a list of ``VideoClip`` (ordered frame paths, a label path or None per frame, and the frames
where a new shot starts). Frames are read through an ordinary still-image ``SegmentationDataset`` holding every
frame of every clip in order, so transforms, label validation and errors are exactly those of the still-image
datasets. Two layouts:

* ``CityscapesSequenceDataset``: the official sequence layout::

      <root>/leftImg8bit_sequence/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png   (30-frame snippets)
      <root>/gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png            (the 20th frame; any frame
                                                                                          that has one is used)
      <root>/videos.json                                                                (optional: shot cuts)

  A clip is one run of consecutive frame numbers of a (city, seq); it is named ``<city>/<city>_<seq>``, or
  ``<city>/<city>_<seq>_<first frame>`` for every run when a seq has several (gaps in the numbering, as in
  frankfurt).
* ``FrameFolderDataset``: a user's own videos, one folder per video::

      <root>/classes.txt                          one class name per line (or pass classes=)
      <root>/images/<split>/<video>/<frame>.<ext> frames in natural name order (frame2 before frame10)
      <root>/masks/<split>/<video>/<frame>.png    optional, class indices (any subset of the frames)
      <root>/videos.json                          optional: shot cuts

  A video is a deepest folder holding images (``<video>`` may be nested, e.g. ``street/day1``); frames lying
  directly in ``images/<split>/`` form one video named after the split. A folder holding both frames and
  sub-folders with frames is an error (which frames belong to which video would be a guess).

``videos.json`` (written by ``synthetic_video``) lists per split each clip's name, frame count and ``cuts``: the
frame indices (> 0) where a new shot starts, so accuracy can be reported against the frames since a cut.

``stream_batches`` plays the clips on B parallel streams (the batch of a streaming model whose state carries
from one frame to the next) and says per slot when the state must be reset.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Set, Tuple, Union

import numpy as np
import torch

from .cityscapes import LABEL_SUFFIXES, label_order, left_images, read_cityscapes_label, split_folder
from .cityscapes_labels import CITYSCAPES_CLASSES, CITYSCAPES_PALETTE, IGNORE_INDEX
from .errors import DatasetLayoutError
from .segmentation import IMAGE_EXTENSIONS, FolderPairDataset, SegmentationDataset, existing_dirs

__all__ = ["VideoClip", "VideoSegmentationDataset", "CityscapesSequenceDataset", "FrameFolderDataset", "FrameBatch",
           "stream_batches", "frames_since_cut", "natural_key", "read_video_manifest", "write_video_manifest",
           "cityscapes_sequence_layout_help", "frame_folder_layout_help", "MANIFEST_NAME"]

PathLike = Union[str, Path]
MANIFEST_NAME = "videos.json"
MANIFEST_FORMAT = "mdeq-video-manifest"
_SEQ_IMAGE = re.compile(r"^(?P<city>.+)_(?P<seq>\d+)_(?P<frame>\d+)_leftImg8bit\.png$")


# ------------------------------------------------------------------------------------------------ clips
@dataclass(frozen=True)
class VideoClip:
    """One video: frame image paths in order, a label path or None per frame, and the shot cuts (frame indices
    > 0 where a new shot starts, when known)."""

    name: str
    frames: Tuple[str, ...]
    labels: Tuple[Optional[str], ...]
    cuts: Tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not self.frames:
            raise ValueError(f"clip {self.name!r} has no frames")
        if len(self.labels) != len(self.frames):
            raise ValueError(f"clip {self.name!r} has {len(self.frames)} frames but {len(self.labels)} label entries "
                             f"(one label path or None per frame)")
        _check_cuts(self.cuts, len(self.frames), f"clip {self.name!r}")

    @property
    def annotated(self) -> Tuple[int, ...]:
        """Indices of the frames that have a label file."""
        return tuple(i for i, label in enumerate(self.labels) if label is not None)


def _check_cuts(cuts: Sequence[int], n_frames: int, where: str) -> None:
    """Cuts must be increasing whole frame indices in 1..n_frames-1 (frame 0 starts the clip anyway)."""
    ok = all(isinstance(c, (int, np.integer)) and not isinstance(c, bool) for c in cuts)
    if not ok or any(not 0 < int(c) < n_frames for c in cuts) or list(cuts) != sorted(set(int(c) for c in cuts)):
        raise ValueError(f"{where}: cuts must be increasing frame indices in 1..{n_frames - 1} (frame 0 starts the "
                         f"clip anyway), got {list(cuts)}")


def frames_since_cut(clip: VideoClip, frame: int) -> int:
    """Frames since the last cut or the clip start (0 on a cut frame): the x-axis of accuracy after a cut."""
    if not 0 <= int(frame) < len(clip.frames):
        raise IndexError(f"frame {frame} is out of range for clip {clip.name!r} ({len(clip.frames)} frames)")
    return int(frame) - max([0] + [c for c in clip.cuts if c <= int(frame)])


def natural_key(name: str) -> Tuple[Tuple[Union[str, int], ...], str]:
    """Sort key ordering digit runs by value ("frame2" before "frame10"), case-insensitive, then by the name."""
    parts = re.split(r"(\d+)", name)  # text at even positions, digit runs at odd ones: types always line up
    return tuple(int(p) if i % 2 else p.lower() for i, p in enumerate(parts)), name


# ------------------------------------------------------------------------------------------------ videos.json
def write_video_manifest(root: PathLike, splits: Mapping[str, Sequence[Tuple[str, int, Sequence[int]]]]) -> Path:
    """Write ``root/videos.json``: per split, each clip's (name, frame count, cuts)."""
    doc = {"format": MANIFEST_FORMAT, "version": 1,
           "splits": {split: [{"name": name, "frames": int(n), "cuts": [int(c) for c in cuts]}
                              for name, n, cuts in clips] for split, clips in splits.items()}}
    path = Path(root) / MANIFEST_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    return path


def read_video_manifest(root: PathLike) -> Dict[str, Dict[str, Tuple[Optional[int], Tuple[int, ...]]]]:
    """``{split: {clip name: (frame count or None, cuts)}}`` from ``root/videos.json``; {} when there is none."""
    path = Path(root) / MANIFEST_NAME
    if not path.is_file():
        return {}
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        out: Dict[str, Dict[str, Tuple[Optional[int], Tuple[int, ...]]]] = {}
        for split, clips in doc["splits"].items():
            out[split] = {str(c["name"]): (None if c.get("frames") is None else int(c["frames"]),
                                           tuple(c.get("cuts", ()))) for c in clips}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise DatasetLayoutError(
            f"cannot read {path}: {type(e).__name__}: {e}; expected JSON like {{\"splits\": {{\"val\": [{{\"name\": "
            f"\"aachen/aachen_000000\", \"frames\": 30, \"cuts\": [10, 20]}}]}}}}") from e
    return out


def _apply_manifest(root: Path, split: str, clips: List[VideoClip]) -> List[VideoClip]:
    """The clips with their ``cuts`` from ``root/videos.json`` (if any); entries naming no clip are an error."""
    entries = read_video_manifest(root).get(split, {})
    by_name = {c.name: c for c in clips}
    unknown = sorted(set(entries) - set(by_name))
    if unknown:
        raise DatasetLayoutError(f"{root / MANIFEST_NAME} lists {len(unknown)} '{split}' clips that are not in the "
                                 f"data, e.g. {unknown[:3]} (clips found: {sorted(by_name)[:5]}"
                                 f"{' ...' if len(by_name) > 5 else ''})")
    out = []
    for clip in clips:
        if clip.name not in entries:
            out.append(clip)
            continue
        n, cuts = entries[clip.name]
        where = f"{root / MANIFEST_NAME}, clip {clip.name!r}"
        if n is not None and n != len(clip.frames):
            raise DatasetLayoutError(f"{where}: lists {n} frames but {len(clip.frames)} are on disk")
        try:
            _check_cuts(cuts, len(clip.frames), where)
        except ValueError as e:
            raise DatasetLayoutError(str(e)) from None
        out.append(VideoClip(clip.name, clip.frames, clip.labels, tuple(int(c) for c in cuts)))
    return out


# ------------------------------------------------------------------------------------------------ base
class _FrameTable(SegmentationDataset):
    """All frames of all clips as one still-image dataset; the label reader is the layout's."""

    def __init__(self, classes: Sequence[str], samples: Sequence[Tuple[str, Optional[str]]], image_root: Path,
                 read_label: Callable[[str], np.ndarray], transform=None, ignore_index: int = IGNORE_INDEX,
                 palette: Optional[np.ndarray] = None):
        super().__init__(classes, samples, image_root, transform=transform, ignore_index=ignore_index,
                         palette=palette)
        self._read = read_label

    def read_label(self, index: int) -> np.ndarray:
        path = self.samples[index][1]
        assert path is not None
        return self._read(path)


class VideoSegmentationDataset:
    """Clips of a video segmentation set; frames are read by ``frame_table``, a still-image dataset over every
    frame of every clip in clip order (its transform, label validation and errors apply).

    ``transform`` is an albumentations eval transform (``build_seg_eval_transform()``) or None (the same
    ImageNet normalisation without albumentations); frames come back as a float (3, H, W) image and a long
    (H, W) mask of class indices with ``ignore_index``, or None for a frame without a label.
    """

    classes: List[str]
    clips: List[VideoClip]

    def __init__(self, frame_table: SegmentationDataset, clips: Sequence[VideoClip]):
        self.frame_table = frame_table
        self.clips = list(clips)
        self.classes = list(frame_table.classes)
        self.num_classes = frame_table.num_classes
        self.ignore_index = frame_table.ignore_index
        self.palette = frame_table.palette
        self._offsets = np.cumsum([0] + [len(c.frames) for c in self.clips]).tolist()
        expected = [(f, lab) for c in self.clips for f, lab in zip(c.frames, c.labels)]
        if [tuple(s) for s in frame_table.samples] != expected:
            raise ValueError("the frame table must hold every frame of every clip, in clip order")

    @property
    def transform(self):
        return self.frame_table.transform

    @transform.setter
    def transform(self, value) -> None:
        self.frame_table.transform = value

    def __len__(self) -> int:
        return len(self.clips)

    def _clip_index(self, clip: Union[int, VideoClip]) -> int:
        if isinstance(clip, VideoClip):
            return self.clips.index(clip)
        i = int(clip)
        if not 0 <= i < len(self.clips):
            raise IndexError(f"clip index {clip} is out of range ({len(self.clips)} clips)")
        return i

    def _frame_index(self, clip: Union[int, VideoClip], frame: int) -> int:
        i = self._clip_index(clip)
        n = len(self.clips[i].frames)
        if not 0 <= int(frame) < n:
            raise IndexError(f"frame {frame} is out of range for clip {self.clips[i].name!r} ({n} frames)")
        return self._offsets[i] + int(frame)

    def num_frames(self, clip: Union[int, VideoClip]) -> int:
        """Number of frames of a clip (an index or the clip itself)."""
        return len(self.clips[self._clip_index(clip)].frames)

    def load_frame(self, clip: Union[int, VideoClip], frame: int) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(image float (3, H, W), mask long (H, W) in class indices, or None when the frame has no label)."""
        index = self._frame_index(clip, frame)
        image, mask = self.frame_table[index]
        return image, (mask if self.frame_table.samples[index][1] is not None else None)

    def frame_name(self, clip: Union[int, VideoClip], frame: int) -> str:
        """The frame's path relative to the split folder, without extension (where to write its prediction)."""
        return self.frame_table.relative_name(self._frame_index(clip, frame))


# ------------------------------------------------------------------------------------------------ Cityscapes
def cityscapes_sequence_layout_help(root: PathLike) -> str:
    return (
        "expected the official Cityscapes sequence layout:\n"
        f"  {root}/\n"
        "    leftImg8bit_sequence/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png   "
        "e.g. leftImg8bit_sequence/val/frankfurt/frankfurt_000000_000275_leftImg8bit.png\n"
        "    gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png              "
        "(and/or ..._gtFine_labelTrainIds.png; the 20th frame of each 30-frame snippet is annotated)\n"
        f"    {MANIFEST_NAME}                                                           (optional: shot cuts)\n"
        "(a clip is one run of consecutive frame numbers of a <city>_<seq>; labelIds hold the official ids 0..33 "
        "and are mapped to the 19 train ids, labelTrainIds hold 0..18 and 255)"
    )


class CityscapesSequenceDataset(VideoSegmentationDataset):
    """The official ``leftImg8bit_sequence`` snippets with the ``gtFine`` labels of the frames that have them
    (19 classes). ``label_type``: "auto" (``labelTrainIds`` when that file exists, else ``labelIds``),
    "labelIds" or "labelTrainIds". ``require_labels``: every clip must have at least one annotated frame."""

    def __init__(self, root: PathLike, split: str = "val", transform=None, label_type: str = "auto",
                 require_labels: bool = True):
        order = label_order(label_type)
        self.root, self.split, self.label_type = Path(root), split, label_type
        image_dir = split_folder(self.root, "leftImg8bit_sequence", split, cityscapes_sequence_layout_help(self.root),
                                 "Cityscapes sequence")
        clips = _apply_manifest(self.root, split, self._find_clips(image_dir, order))
        if require_labels:
            bare = [c for c in clips if not c.annotated]
            if bare:
                frame = Path(bare[0].frames[min(19, len(bare[0].frames) - 1)])
                expected = (self.root / "gtFine" / split / frame.parent.relative_to(image_dir)
                            / frame.name.replace("_leftImg8bit.png", LABEL_SUFFIXES[order[-1]]))
                raise DatasetLayoutError(
                    f"{len(bare)} of {len(clips)} clips in {image_dir} have no annotated frame, e.g. {bare[0].name} "
                    f"(expected e.g. {expected}; pass require_labels=False to play unlabelled clips); "
                    + cityscapes_sequence_layout_help(self.root))
        samples = [(f, lab) for c in clips for f, lab in zip(c.frames, c.labels)]
        table = _FrameTable(CITYSCAPES_CLASSES, samples, image_dir, read_cityscapes_label, transform=transform,
                            ignore_index=IGNORE_INDEX, palette=CITYSCAPES_PALETTE.copy())
        super().__init__(table, clips)

    def _find_clips(self, image_dir: Path, order: Tuple[str, ...]) -> List[VideoClip]:
        """Group the frames by (folder, city, seq), split each group at gaps in the frame numbers."""
        images = left_images(image_dir, "frames", cityscapes_sequence_layout_help(self.root))
        groups: Dict[Tuple[str, str, str], List[Tuple[int, Path]]] = {}
        for image in images:
            m = _SEQ_IMAGE.match(image.name)
            if m is None:
                raise DatasetLayoutError(f"frame file {image} is not named <city>_<seq>_<frame>_leftImg8bit.png with "
                                         f"numeric <seq> and <frame>; " + cityscapes_sequence_layout_help(self.root))
            folder = image.parent.relative_to(image_dir).as_posix()
            groups.setdefault((folder, m["city"], m["seq"]), []).append((int(m["frame"]), image))
        label_dir = self.root / "gtFine" / self.split
        on_disk = {p.relative_to(label_dir).as_posix() for p in label_dir.rglob("*_gtFine_label*Ids.png")}  # one walk
        clips = []
        for (folder, city, seq), frames in sorted(groups.items()):
            frames.sort()
            runs: List[List[Path]] = []
            for k, (number, image) in enumerate(frames):
                if k == 0 or number != frames[k - 1][0] + 1:
                    runs.append([])
                runs[-1].append(image)
            prefix = f"{folder}/" if folder != "." else ""
            for run in runs:
                name = f"{prefix}{city}_{seq}"
                if len(runs) > 1:
                    name += "_" + _SEQ_IMAGE.match(run[0].name)["frame"]
                labels = tuple(self._label_for(label_dir, folder, image.name, order, on_disk) for image in run)
                clips.append(VideoClip(name, tuple(str(p) for p in run), labels))
        return clips

    @staticmethod
    def _label_for(label_dir: Path, folder: str, image_name: str, order: Tuple[str, ...], on_disk: Set[str]
                   ) -> Optional[str]:
        """The frame's gtFine file of the first label type in ``order`` that exists, else None."""
        stem = image_name[: -len("_leftImg8bit.png")]
        for kind in order:
            rel = (Path(folder) / (stem + LABEL_SUFFIXES[kind])).as_posix()
            if rel in on_disk:
                return str(label_dir / rel)
        return None


# ------------------------------------------------------------------------------------------------ own videos
def frame_folder_layout_help(root: PathLike) -> str:
    return (
        "expected one folder of frames per video:\n"
        f"  {root}/\n"
        "    classes.txt                                 one class name per line (line i = class index i), or "
        "pass classes=\n"
        "    images/<split>/<video>/<frame>.<ext>        e.g. images/val/street/frame0001.jpg (natural name order: "
        "frame2 before frame10)\n"
        "    masks/<split>/<video>/<frame>.png           optional, any subset of the frames (same relative path, "
        "PNG)\n"
        f"    {MANIFEST_NAME}                                 optional: shot cuts per video\n"
        f"(a video is a deepest folder holding images; frames directly in images/<split>/ form one video named after "
        f"the split; image extensions: {' '.join(IMAGE_EXTENSIONS)}; masks are single-channel class indices "
        "0..C-1, with the ignore index for pixels that do not count)"
    )


class FrameFolderDataset(VideoSegmentationDataset):
    """A user's own videos as folders of frames, with masks for any subset of the frames (class indices).

    ``classes``: names in index order, or None to read ``root/classes.txt``. ``require_labels``: every video
    must have at least one mask (off by default: unlabelled videos can be played and their predictions saved).
    """

    def __init__(self, root: PathLike, split: str = "val", classes: Optional[Sequence[str]] = None, transform=None,
                 ignore_index: int = IGNORE_INDEX, require_labels: bool = False):
        self.root, self.split = Path(root), split
        image_dir = self._check_layout(classes)
        # the still-image reader of images/<split>/** + masks/<split>/**: class names, masks and their checks
        table = FolderPairDataset(self.root, split, classes=classes, transform=transform, ignore_index=ignore_index,
                                  require_labels=False)
        videos: Dict[str, List[Tuple[str, Optional[str]]]] = {}
        for image, mask in table.samples:
            folder = Path(image).parent.relative_to(image_dir).as_posix()
            videos.setdefault(folder, []).append((image, mask))
        self._check_not_nested(image_dir, videos)
        clips = []
        for folder in sorted(videos, key=natural_key):
            frames = sorted(videos[folder], key=lambda s: natural_key(Path(s[0]).name))
            clips.append(VideoClip(split if folder == "." else folder, tuple(f for f, _ in frames),
                                   tuple(m for _, m in frames)))
        clips = _apply_manifest(self.root, split, clips)
        if require_labels:
            bare = [c for c in clips if not c.annotated]
            if bare:
                expected = self.root / "masks" / split / Path(bare[0].frames[0]).relative_to(image_dir)
                raise DatasetLayoutError(
                    f"{len(bare)} of {len(clips)} videos in {image_dir} have no mask, e.g. {bare[0].name} (expected "
                    f"e.g. {expected.with_suffix('.png')}; pass require_labels=False to play unlabelled videos); "
                    + frame_folder_layout_help(self.root))
        table.samples = [(f, m) for c in clips for f, m in zip(c.frames, c.labels)]
        super().__init__(table, clips)

    def _check_layout(self, classes: Optional[Sequence[str]]) -> Path:
        """The common layout mistakes, reported with the video layout (the rest is checked by the frame reader)."""
        root = self.root
        if not root.is_dir():
            raise DatasetLayoutError(f"video root {root} does not exist or is not a folder; "
                                     + frame_folder_layout_help(root))
        if classes is None and not (root / "classes.txt").is_file():
            raise DatasetLayoutError(f"no class names: pass classes=[...] or write {root / 'classes.txt'}; "
                                     + frame_folder_layout_help(root))
        image_dir = root / "images" / self.split
        if not image_dir.is_dir():
            raise DatasetLayoutError(f"no '{self.split}' split in {root / 'images'} (found splits: "
                                     f"{existing_dirs(root / 'images') or 'none'}); " + frame_folder_layout_help(root))
        if not any(p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS for p in image_dir.rglob("*")):
            raise DatasetLayoutError(f"no frames under {image_dir}; " + frame_folder_layout_help(root))
        return image_dir

    def _check_not_nested(self, image_dir: Path, videos: Mapping[str, object]) -> None:
        for folder in videos:
            inner = [f for f in videos if f != folder and (folder == "." or f.startswith(folder + "/"))]
            if inner:
                raise DatasetLayoutError(
                    f"{image_dir / folder} holds frames and also sub-folders with frames (e.g. {image_dir / inner[0]});"
                    f" put each video's frames in a folder of its own; " + frame_folder_layout_help(self.root))


# ------------------------------------------------------------------------------------------------ streaming
@dataclass
class FrameBatch:
    """One time step of B parallel streams.

    ``images`` (B, 3, H, W); ``masks`` a list of B long (H, W) masks or None (no label, or an idle slot);
    ``reset`` (B,) bool: the slot starts a new clip on this step (every slot on the first step), so its state
    must be cleared; ``clip`` / ``frame`` (B,) long: clip index and frame index within it (-1 for an idle slot);
    ``active`` (B,) bool: False for an idle slot, whose image only repeats its last frame to keep the batch shape.
    """

    images: torch.Tensor
    masks: List[Optional[torch.Tensor]]
    reset: torch.Tensor
    clip: torch.Tensor
    frame: torch.Tensor
    active: torch.Tensor


def _advance(dataset: VideoSegmentationDataset, clip: List[int], frame: List[int], next_clip: int
             ) -> Tuple[int, List[bool]]:
    """Move every slot one frame on; a slot whose clip ended takes the next clip (slots in order) or goes idle."""
    started = [False] * len(clip)
    for s in range(len(clip)):
        if clip[s] >= 0 and frame[s] + 1 < dataset.num_frames(clip[s]):
            frame[s] += 1
        elif next_clip < len(dataset.clips):
            clip[s], frame[s], started[s] = next_clip, 0, True
            next_clip += 1
        else:
            clip[s], frame[s] = -1, -1
    return next_clip, started


def _check_sizes(dataset: VideoSegmentationDataset, images: Sequence[Optional[torch.Tensor]],
                 shown: Sequence[Tuple[int, int]]) -> None:
    """All frames of one step (idle slots' repeated frames included) must share one size."""
    sizes = {shown[s]: tuple(im.shape[-2:]) for s, im in enumerate(images) if im is not None}
    if len(set(sizes.values())) > 1:
        desc = ", ".join(f"clip {dataset.clips[c].name!r} frame {f}: {h}x{w}" for (c, f), (h, w) in sizes.items())
        raise ValueError(f"frames played together on parallel streams differ in size ({desc}; H x W); streams > 1 "
                         f"needs one frame size for every clip: use streams=1 for clips of different sizes")


def stream_batches(dataset: VideoSegmentationDataset, streams: int) -> Iterator[FrameBatch]:
    """Play every clip of ``dataset`` once on ``streams`` parallel slots, one ``FrameBatch`` per time step.

    Clip i goes to the first slot that is free (clips in order); a slot without a clip left stays idle (its last
    frame repeated, or zeros if it never played, ``active`` False) until every slot is idle. With streams > 1
    every frame must have the same size (a ValueError names the clips otherwise); streams=1 plays any sizes.
    """
    if isinstance(streams, bool) or not isinstance(streams, (int, np.integer)) or streams < 1:
        raise ValueError(f"streams must be a whole number >= 1, got {streams!r}")
    b = int(streams)
    clip, frame = [-1] * b, [-1] * b
    last: List[Optional[torch.Tensor]] = [None] * b  # each slot's latest image (repeated while it is idle)
    shown = [(-1, -1)] * b  # (clip, frame) of that image
    next_clip, first = 0, True
    while True:
        next_clip, started = _advance(dataset, clip, frame, next_clip)
        if all(c < 0 for c in clip):
            return
        masks: List[Optional[torch.Tensor]] = [None] * b
        for s in range(b):
            if clip[s] >= 0:
                last[s], masks[s] = dataset.load_frame(clip[s], frame[s])
                shown[s] = (clip[s], frame[s])
        if b > 1:
            _check_sizes(dataset, last, shown)
        ref = next(im for im in last if im is not None)
        images = [ref.new_zeros(ref.shape) if im is None else im for im in last]
        yield FrameBatch(images=torch.stack(images), masks=masks,
                         reset=torch.tensor([first or st for st in started]),
                         clip=torch.tensor(clip, dtype=torch.long), frame=torch.tensor(frame, dtype=torch.long),
                         active=torch.tensor([c >= 0 for c in clip]))
        first = False
