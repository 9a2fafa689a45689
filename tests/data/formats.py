"""Writers of small classification fixtures in the formats the tools read besides ImageFolder: a Hugging Face
``DatasetDict`` (saved with ``save_to_disk`` or as a Hub-layout folder of parquet files) and WebDataset shards
written with webdataset's own ``TarWriter``."""
import io
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

from PIL import Image

Samples = List[Tuple[Image.Image, int]]  # (image, class index)


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def imagefolder_samples(folder: Path) -> Tuple[List[str], Samples]:
    """(classes, [(image, class index)]) of one ImageFolder split, in the order ImageFolderDataset lists them."""
    from mdeq.data.classification import ImageFolderDataset

    ds = ImageFolderDataset(folder)
    return ds.classes, [(ds.load(i), t) for i, t in enumerate(ds.targets)]


def hf_dataset_dict(splits: Dict[str, Samples], classes: Sequence[str], image_key: str = "image",
                    label_key: str = "label", names_as_strings: bool = False):
    import datasets

    label = datasets.Value("string") if names_as_strings else datasets.ClassLabel(names=list(classes))
    features = datasets.Features({image_key: datasets.Image(), label_key: label, "note": datasets.Value("string")})
    return datasets.DatasetDict({
        split: datasets.Dataset.from_dict(
            {image_key: [{"bytes": png_bytes(img), "path": None} for img, _ in samples],
             label_key: [classes[t] if names_as_strings else t for _, t in samples],
             "note": [f"{split}-{i}" for i in range(len(samples))]}, features=features)
        for split, samples in splits.items()})


def write_hf_saved(path: Path, splits: Dict[str, Samples], classes: Sequence[str], **kw) -> Path:
    hf_dataset_dict(splits, classes, **kw).save_to_disk(str(path))
    return path


def write_hf_parquet(path: Path, splits: Dict[str, Samples], classes: Sequence[str], **kw) -> Path:
    """A local folder in a Hub dataset repository's layout: data/<split>-00000-of-00001.parquet."""
    (path / "data").mkdir(parents=True)
    for split, ds in hf_dataset_dict(splits, classes, **kw).items():
        ds.to_parquet(str(path / "data" / f"{split}-00000-of-00001.parquet"))
    return path


def write_wds_shards(folder: Path, prefix: str, samples: Samples, per_shard: int, image_ext: str = "png",
                     label: str = "cls") -> List[Path]:
    """``<prefix>-000000.tar`` ... with ``per_shard`` samples each (keys ``<prefix>_<index>``); ``label`` "cls"
    writes the class index as a .cls file, "json:<field>" as a field of a .json sidecar."""
    import webdataset

    folder.mkdir(parents=True, exist_ok=True)
    shards = []
    for start in range(0, len(samples), per_shard):
        path = folder / f"{prefix}-{start // per_shard:06d}.tar"
        with webdataset.TarWriter(str(path)) as sink:
            for i, (img, target) in enumerate(samples[start:start + per_shard], start):
                sample = {"__key__": f"{prefix}_{i:05d}", image_ext: png_bytes(img)}
                if label == "cls":
                    sample["cls"] = str(target).encode()
                else:
                    sample["json"] = {label.split(":", 1)[1]: target, "source": "test"}
                sink.write(sample)
        shards.append(path)
    return shards
