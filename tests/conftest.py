"""Shared fixtures. ``tiny_caption_data``: a generated local_caption dataset (see tests/helpers_data.py)."""
import importlib.util
from pathlib import Path

import pytest


def _load_helpers():
    path = Path(__file__).with_name("helpers_data.py")
    spec = importlib.util.spec_from_file_location("evlgen_tests_helpers_data", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


helpers_data = _load_helpers()


@pytest.fixture(scope="session")
def tiny_caption_data(tmp_path_factory):
    """Factory: ``tiny_caption_data(**make_caption_data kwargs)`` -> (paths dict, --options list)."""

    def make(**kwargs):
        root = tmp_path_factory.mktemp("tiny_caption_data")
        paths = helpers_data.make_caption_data(str(root), **kwargs)
        return paths, helpers_data.data_options(paths)

    return make
