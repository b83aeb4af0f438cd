"""Command line and config loading for train.py / evaluate.py, with errors that name the config key.

:class:`EvlgenConfig` is LAVIS's ``lavis.common.config.Config`` (``--cfg-path`` yaml, ``--options k=v``
overrides merged over the model's and datasets' default yamls) with three changes:

* an unknown model arch, model type, dataset builder or dataset config type raises :class:`ConfigError`
  naming the key and the registered choices (LAVIS fails with ``AttributeError: 'NoneType' ...``);
* ``--options model.arch=... model.model_type=...`` select the default yaml that is merged (LAVIS reads
  a flat ``"model.model_type"`` key that its own dot-list parsing never produces, and ignores an
  overridden arch);
* :func:`validate_config` checks the run section (task and runner registered, splits present).
"""
import argparse

from lavis.common.config import Config
from lavis.common.registry import registry
from omegaconf import OmegaConf


class ConfigError(ValueError):
    """A run config names something that does not exist (the message names the key and the fix)."""


def parse_args(argv=None, description="EVLGen training"):
    """LAVIS's command line: ``--cfg-path PATH [--options key=value ...]``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--cfg-path", required=True, help="path to the run configuration yaml")
    parser.add_argument(
        "--options",
        nargs="+",
        help="override settings of the config, as key=value pairs in OmegaConf dot-list form, e.g. "
        "run.max_iters=100 datasets.local_caption.build_info.images.storage=/data/images",
    )
    return parser.parse_args(argv)


def _names(mapping_key):
    return sorted(registry.mapping[mapping_key])


class EvlgenConfig(Config):
    """LAVIS's Config with validated model/dataset sections (see the module docstring)."""

    def __init__(self, args):
        try:
            OmegaConf.load(args.cfg_path)
        except FileNotFoundError:
            raise ConfigError(f"--cfg-path {args.cfg_path!r} does not exist") from None
        super().__init__(args)

    @staticmethod
    def build_model_config(config, **kwargs):
        model = config.get("model", None)
        if model is None:
            raise ConfigError("the config has no `model:` section: set model.arch and model.model_type")
        override = kwargs.get("model", None) or {}
        arch = override.get("arch", None) or model.get("arch", None)
        model_cls = registry.get_model_class(arch) if arch else None
        if model_cls is None:
            raise ConfigError(
                f"model.arch={arch!r} is not a registered model; registered: {_names('model_name_mapping')} "
                "(EVLGen's models are registered by `import evlgen_lavis`)"
            )
        model_type = override.get("model_type", None) or model.get("model_type", None)
        types = sorted(getattr(model_cls, "PRETRAINED_MODEL_CONFIG_DICT", {}) or {})
        if not model_type:
            raise ConfigError(f"model.model_type is not set; model {arch!r} has the types {types}")
        if model_type not in types:
            raise ConfigError(f"model.model_type={model_type!r} is not a type of model {arch!r}; known types: {types}")
        default = OmegaConf.load(model_cls.default_config_path(model_type=model_type))
        return OmegaConf.merge(OmegaConf.create(), default, {"model": config["model"]},
                               {"model": {"model_type": model_type}})

    @staticmethod
    def build_runner_config(config):
        run = config.get("run", None)
        if run is None:
            raise ConfigError("the config has no `run:` section: set at least run.task and run.runner")
        return {"run": run}

    @staticmethod
    def build_dataset_config(config):
        datasets = config.get("datasets", None)
        if not datasets:
            raise ConfigError("the config has no `datasets:` section: name at least one dataset builder")
        dataset_config = OmegaConf.create()
        for name in datasets:
            builder_cls = registry.get_builder_class(name)
            if builder_cls is None:
                raise ConfigError(
                    f"datasets.{name}: no dataset builder named {name!r} is registered; registered: "
                    f"{_names('builder_name_mapping')}"
                )
            entry = datasets[name] or {}
            config_type = entry.get("type", "default")
            known = sorted(getattr(builder_cls, "DATASET_CONFIG_DICT", {}) or {})
            if config_type not in known:
                raise ConfigError(f"datasets.{name}.type={config_type!r} is unknown; known: {known}")
            dataset_config = OmegaConf.merge(
                dataset_config,
                OmegaConf.load(builder_cls.default_config_path(type=config_type)),
                {"datasets": {name: entry}},
            )
        return dataset_config


def load_config(argv=None, description="EVLGen training"):
    """Parse ``argv`` (default ``sys.argv[1:]``) and build the validated :class:`EvlgenConfig`."""
    cfg = EvlgenConfig(parse_args(argv, description))
    validate_config(cfg)
    return cfg


def validate_config(cfg):
    """Check the run section's names against the registry and the configured splits."""
    run = cfg.run_cfg
    task = run.get("task", None)
    if not task or registry.get_task_class(task) is None:
        raise ConfigError(f"run.task={task!r} is not a registered task; registered: {_names('task_name_mapping')}")
    runner = run.get("runner", "runner_base")
    if registry.get_runner_class(runner) is None:
        raise ConfigError(
            f"run.runner={runner!r} is not a registered runner; registered: {_names('runner_name_mapping')}"
        )
    known_splits = set()
    for name, entry in cfg.datasets_cfg.items():
        known_splits.update(((entry.get("build_info", None) or {}).get("annotations", None) or {}).keys())
    for key in ("train_splits", "valid_splits", "test_splits"):
        splits = run.get(key, None) or []
        if isinstance(splits, str):
            raise ConfigError(f"run.{key} must be a list of split names, e.g. [{splits}], got the string {splits!r}")
        missing = [s for s in splits if known_splits and s not in known_splits]
        if missing:
            raise ConfigError(
                f"run.{key} names split(s) {missing} that no dataset configures "
                f"(build_info.annotations has {sorted(known_splits)})"
            )
    return cfg
