"""Small helpers shared across the package."""
import os

from lavis.common.registry import registry

PACKAGE_ROOT = os.path.dirname(os.path.abspath(__file__))
CACHE_ROOT = os.environ.get(
    "EVLGEN_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "evlgen_lavis")
)

_KINDS = {
    "model": ("model_name_mapping", registry.register_model),
    "processor": ("processor_name_mapping", registry.register_processor),
    "builder": ("builder_name_mapping", registry.register_builder),
    "task": ("task_name_mapping", registry.register_task),
    "runner": ("runner_name_mapping", registry.register_runner),
}


def registry_once(kind, name):
    """Decorator like ``registry.register_<kind>(name)`` that tolerates re-registration of the same
    class (a module imported twice, e.g. by path and by package) instead of raising KeyError."""
    mapping_key, register = _KINDS[kind]

    def wrap(cls):
        existing = registry.mapping[mapping_key].get(name)
        if existing is not None:
            same = (existing.__module__, existing.__qualname__) == (cls.__module__, cls.__qualname__)
            if not same:
                raise KeyError(f"{kind} name '{name}' is already registered by {existing!r}")
            registry.mapping[mapping_key][name] = cls
            return cls
        return register(name)(cls)

    return wrap


def config_path(*parts):
    """Absolute path of a yaml shipped inside the package (LAVIS accepts absolute paths)."""
    return os.path.join(PACKAGE_ROOT, "configs", *parts)


def atomic_save(obj, path):
    """``torch.save(obj, path)`` through a temporary file in the same directory and ``os.replace``: a
    reader (or a crash) never sees a half-written file."""
    import tempfile

    import torch

    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.splitext(path)[1], dir=directory)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def atomic_dir(target, fill):
    """Create the folder ``target`` by calling ``fill(tmp)`` on a temporary sibling folder and renaming it.
    Returns ``target``; if it already exists nothing is done. Safe when several processes race: the
    first rename wins and the others keep its result."""
    import shutil
    import tempfile

    if os.path.isdir(target):
        return target
    parent = os.path.dirname(os.path.abspath(target))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(target), dir=parent)
    try:
        fill(tmp)
        os.rename(tmp, target)
    except OSError:
        if not os.path.isdir(target):
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
