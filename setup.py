from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
version = {}
for line in (here / "mdeq" / "__init__.py").read_text().splitlines():
    if line.startswith("__version__"):
        exec(line, version)

setup(
    name="mdeq-zoo",
    version=version["__version__"],
    description="Multiscale deep equilibrium (MDEQ) vision backbones for timm, with a shared DEQ core",
    long_description=(here / "README.md").read_text(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.9",
    packages=find_packages(include=["mdeq", "mdeq.*", "zoo", "zoo.*"]),
    package_data={"zoo": ["*.json", "weights/*.safetensors"], "mdeq.configs": ["*.yaml", "*/*.yaml"]},
    install_requires=[
        "torch>=2.1,<=2.14.1",
        "torchvision",
        "timm>=1.0,<1.1",
        "albumentations==2.0.8",
        "hydra-core>=1.3,<1.4",
        "tensorboard",
        "safetensors",
        "huggingface_hub",
        "scikit-learn",
        "tqdm",
        "matplotlib",
        "numpy",
    ],
    extras_require={
        # the export tests write and run ONNX files; the encoder tests build smp models; the download tests fetch
        # through gdown from a local server that answers like Google Drive; the data tests read Hugging Face and
        # WebDataset fixtures; sybil runs the code blocks of README.md and docs/; xdist runs the suite on every core
        "dev": ["pytest>=7", "pytest-xdist>=3.5", "sybil>=9", "onnx", "onnxruntime", "onnxscript",
                "segmentation-models-pytorch", "gdown", "datasets>=2.16", "webdataset>=0.2.86"],
        "docs": ["mkdocs>=1.6", "mkdocs-material>=9.5", "mkdocstrings[python]>=0.26"],  # mkdocs build --strict
        "hf": ["datasets>=2.16"],  # data.name=hfds/<hub name or saved folder>
        "wds": ["webdataset>=0.2.86"],  # data.name=wds/<shards>
        "export": ["onnx", "onnxruntime", "onnxscript"],  # torch.onnx.export (dynamo) needs onnx + onnxscript
        "gdrive": ["gdown"],  # released checkpoints behind Google Drive's confirmation page
        "smp": ["segmentation-models-pytorch"],  # MDEQ encoders inside segmentation_models_pytorch
    },
    entry_points={"console_scripts": [
        f"mdeq-{name.replace('_', '-')}=mdeq.cli.{name}:main"
        for name in ("train_cls", "train_seg", "finetune", "eval_cls", "eval_seg", "distill", "publish_weights",
                     "convert_official", "benchmark", "export")
    ]},
)
