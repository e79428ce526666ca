"""Install neurohand.

The four source folders install as one namespace, ``neurohand.decoder``,
``neurohand.firmware_bridge``, ``neurohand.train`` and ``neurohand.deploy``,
so nothing generic like ``train`` lands in site-packages.  ``neurohand`` itself
is an implicit namespace package (PEP 420, Python 3.3+).

Base requirements are what the Jetson runtime needs and nothing more; this file
must install with JetPack 4.6's Python 3.6.9 and pip 21.3.1 as well as on a
modern workstation.
"""
import os
import re

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE_FOLDERS = ("decoder", "firmware_bridge", "train", "deploy")


def read_version():
    with open(os.path.join(HERE, "deploy", "version.py")) as handle:
        return re.search(r'__version__ = "([^"]+)"', handle.read()).group(1)


def find_packages():
    packages = []
    for folder in SOURCE_FOLDERS:
        for dirpath, dirnames, filenames in os.walk(os.path.join(HERE, folder)):
            dirnames[:] = [d for d in dirnames if not d.startswith((".", "__"))]
            if "__init__.py" in filenames:
                relative = os.path.relpath(dirpath, HERE)
                packages.append("neurohand." + relative.replace(os.sep, "."))
    return sorted(packages)


def read_readme():
    # utf-8 explicitly: a Jetson reached over ssh often has the C locale (ASCII).
    with open(os.path.join(HERE, "README.md"), encoding="utf-8") as handle:
        return handle.read()


setup(
    name="neurohand",
    version=read_version(),
    description="Decode finger movements from nerve signals on a Jetson and drive a prosthetic hand",
    long_description=read_readme(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.6",
    packages=find_packages(),
    # collect's web display ships its page, script and style: no CDN.
    package_data={"neurohand.deploy.collect": ["web/*"]},
    package_dir={"neurohand." + folder: folder for folder in SOURCE_FOLDERS},
    install_requires=[
        # JetPack 4.6 ships numpy 1.19 for Python 3.6; nothing newer is required.
        "numpy>=1.19",
        "pyserial>=3.5",
    ],
    extras_require={
        # Workstation: training, export, reports.  Install a CUDA build of torch
        # first if you have a GPU (see README); pip then keeps it.
        "train": [
            "torch>=2.0",
            "onnx>=1.14",
            "onnxruntime>=1.16",
            "scipy>=1.10",
            "matplotlib>=3.7",
            "tqdm>=4.64",
        ],
        # Jetson: TensorRT itself comes with JetPack (python3-libnvinfer).
        "jetson": ["pycuda>=2021.1"],
        "test": ["pytest>=7.0", "hypothesis>=6.31"],
        # The lab's tools (workstation; each imported only by the command that uses it):
        # Lab Streaming Layer, BrainFlow boards, NWB and XDF files, MNE-Python.
        "lab": ["pylsl>=1.16", "brainflow>=5.10", "pynwb>=2.5", "nwbinspector>=0.5", "pyxdf>=1.16",
                "mne>=1.5"],
    },
    entry_points={"console_scripts": ["neurohand = neurohand.deploy.cli.main:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Medical Science Apps.",
    ],
)
