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
