"""unires-jax: UniRES++ (multi-granularity referring expression segmentation) in JAX/Flax."""

import setuptools

# The PyTorch side is only needed to import/export weights and for the parity tests.
# timm imports torchvision; PyPI has no CPU torchvision that imports beside the CPU torch
# build, so the pair below (CUDA builds that run on the CPU) is pinned together.
TORCH = [
    "torch==2.14.1",
    "torchvision==0.29.1",
    "transformers>=5.0",
    "timm>=1.0",
    "safetensors>=0.4",
    "peft==0.21.2",  # loading an exported LoRA adapter (tests/convert/test_lora_export.py)
]

# Building TFDS datasets (`tfds build`, the Beam builder of MRES-32M) needs TensorFlow and Beam;
# reading them back (`tfds.data_source` + Grain) does not.
BUILD = [
    "tensorflow-cpu>=2.21",
    "apache-beam>=2.77",
    "mlcroissant>=1.1",  # imported by the `tfds build` command line
    "importlib_resources",  # likewise
]

# The web demo (unires-serve). Its browser tests drive Debian's chromium with Selenium; the
# browser and its driver come from the system (.ci/run installs them), never from a download.
SERVE = ["gradio==6.31.0"]

setuptools.setup(
    name="unires-jax",
    version="0.1.0",
    description="UniRES++ multi-granularity referring expression segmentation in JAX/Flax",
    # The top-level configs/ folder installs as unires_jax.configs: `--config=configs/tiny.py`
    # finds it from any directory (unires_jax.config_lib.resolve).
    packages=setuptools.find_packages(
        include=["unires_jax", "unires_jax.*", "tfds_builders", "tfds_builders.*"])
    + ["unires_jax.configs"],
    package_dir={"unires_jax.configs": "configs"},
    package_data={"tfds_builders": ["*/README.md", "*/CITATIONS.bib"]},
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.10",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12",
        "ml-collections>=1.0",
        "einops>=0.8",
        "numpy>=2.0",
        "absl-py>=2.0",
        "etils[epath]>=1.7",
        "safetensors>=0.4",
        "tensorflow-datasets>=4.9.10",
        "grain>=0.2.18",
        "array-record>=0.8",
        "pillow>=11",
        "pycocotools>=2.0.8",
        "transformers>=5.0",
        "tokenizers>=0.22",
        "tensorboardX>=2.6",
        "tqdm>=4.60",
        # int8 / int4 inference (unires_jax/models/quantize.py), which reads two of its internal
        # classes: pinned below its next minor version.
        "qwix>=0.1.8,<0.2",
    ],
    extras_require={
        "build": BUILD,
        "torch": TORCH,
        "xm": ["xmanager>=0.8"],  # launch/launch.py --executor=xm
        # jax[tpu] brings libtpu, for tests/kernels/test_tpu_compile.py (deviceless TPU compiles);
        # pinned to the jax the project is tested with (install_requires only asks jax>=0.10).
        "serve": SERVE,
        # pytest < 9.2: pytest 9.2's structured node IDs make pytest-xdist 3.8 ignore
        # `xdist_group` (the web demo's trained checkpoint would be built on both workers;
        # pytest-dev/pytest-xdist#1386); tests/conftest.py fails the run if that happens.
        "test": TORCH + BUILD + SERVE + ["pytest>=8,<9.2", "pytest-xdist>=3", "hypothesis>=6",
                                         "jax[tpu]==0.10.2", "selenium==4.51.0"],
    },
    entry_points={
        "console_scripts": [
            "unires-summary=unires_jax.cli.summary:run",
            "unires-train=unires_jax.cli.train:run",
            "unires-eval=unires_jax.cli.eval:run",
            "unires-demo=unires_jax.cli.demo:run",
            "unires-segment=unires_jax.cli.segment:run",
            "unires-convert=unires_jax.cli.convert:run",
            "unires-propose=unires_jax.cli.propose:run",
            "unires-serve=unires_jax.cli.serve:run",
            "unires-data=unires_jax.cli.data:run",
        ],
    },
)
