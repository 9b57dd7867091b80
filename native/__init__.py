"""CUDA sources of the GPU cache tier, shipped as package data and compiled at run time by CuPy."""
from pathlib import Path

SOURCE_DIR = Path(__file__).resolve().parent
