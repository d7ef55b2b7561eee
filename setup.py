"""eqssl: equilibrium-constrained (PTEC/PTLOC) self-supervised speech pre-training for fairseq."""

import glob
import os

from setuptools import find_packages, setup

# The recipes (hydra, corpus presets, experiment settings) also go to <prefix>/share/eqssl/recipes,
# where eqssl finds them when installed without the repository (pip install .).
RECIPE_FILES = [(os.path.join("share", "eqssl", folder), sorted(glob.glob(os.path.join(folder, "*.yaml"))))
                for folder in sorted({os.path.dirname(p) for p in glob.glob("recipes/**/*.yaml", recursive=True)})]

setup(
    name="eqssl",
    version="0.1.0",
    description="Equilibrium-constrained self-supervised speech pre-training (PTLOC) as a fairseq plugin",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11,<3.13",
    # hydra_plugins.eqssl_recipes: lets fairseq-hydra-train compose eqssl's recipes from any folder
    packages=find_packages(include=["eqssl", "eqssl.*"]) + ["hydra_plugins.eqssl_recipes"],
    # Hydra finds plugins by listing the hydra_plugins namespace package, which setuptools'
    # default editable install (an import hook) hides; a root package_dir makes `pip install -e`
    # put this folder on sys.path instead, as `setup.py develop` did (hydra issue #2359).
    package_dir={"": "."},
    data_files=RECIPE_FILES,
    # One tested set; see README "Versions" for why each pin is what it is.
    install_requires=[
        "ve-fairseq==0.12.3",
        "torch==2.14.1",
        "torchaudio==2.11.0",
        "numpy>=1.26,<2.5",
        "scipy>=1.11",  # Student's t for the experiment report's intervals and detectable differences
        "soundfile>=0.12",
        # the built-in corpus: eSpeak NG (library and voices in the wheel), word lists, DSP
        "espeakng-loader==0.2.4",
        "wordfreq==3.1.1",
        "soxr>=0.3",
        "audiomentations==0.43.1",
        "pyroomacoustics==0.10.1",
        "tqdm",
        # fairseq's CTC criterion scores greedy decodes with editdistance; eqssl-evaluate with jiwer
        "editdistance>=0.6",
        "jiwer>=3.0",
        "sentencepiece>=0.2",
        # fairseq writes TensorBoard logs (--tensorboard-logdir) with it, and warns without it
        "tensorboardX>=2.6",
    ],
    extras_require={
        # the tests read TensorBoard event files back with tensorboard's own reader
        # pytest-xdist: README's test command runs the test files on every core (-n auto)
        "test": ["pytest>=8", "pytest-xdist>=3.5", "tensorboard>=2.16"],
        "plots": ["matplotlib>=3.8"],
        # eqssl-export --format hf: Hugging Face transformers folders
        "hf": ["transformers==5.24.0", "safetensors>=0.4"],
    },
    entry_points={
        "console_scripts": [
            "eqssl-make-toy-corpus=eqssl.corpus.toy:main",
            "eqssl-user-dir=eqssl.cli.user_dir:main",
            "eqssl-gap=eqssl.cli.gap:main",
            "eqssl-make-corpus=eqssl.corpus.make_corpus:main",
            "eqssl-import=eqssl.corpus.import_cli:main",
            "eqssl-train-spm=eqssl.cli.spm:main",
            "eqssl-evaluate=eqssl.cli.evaluate:main",
            "eqssl-probe=eqssl.cli.probe:main",
            "eqssl-abx=eqssl.cli.abx:main",
            "eqssl-export=eqssl.cli.export:main",
            "eqssl-reproduce=eqssl.cli.reproduce:main",
        ]
    },
)
