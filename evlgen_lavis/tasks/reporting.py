"""Saving results and metrics the way LAVIS's tasks do, in one process or under torch.distributed."""
import json
import os

from lavis.common.dist_utils import is_main_process
from lavis.common.registry import registry
from lavis.tasks.base_task import BaseTask


def run_cfg_of(cfg):
    """The run section of a LAVIS ``Config`` (``cfg.run_cfg``) or of a plain OmegaConf/dict config
    with a top-level ``run`` key."""
    run = getattr(cfg, "run_cfg", None)
    if run is None and hasattr(cfg, "get"):
        run = cfg.get("run")
    if run is None:
        raise ValueError("task config has no run section: pass a LAVIS Config or a config with `run:`")
    return run


def datasets_cfg_of(cfg):
    """The datasets section (``cfg.datasets_cfg`` or ``cfg["datasets"]``), or None."""
    datasets = getattr(cfg, "datasets_cfg", None)
    if datasets is None and hasattr(cfg, "get"):
        datasets = cfg.get("datasets")
    return datasets


def result_dir():
    """Registry path ``result_dir`` (set by LAVIS's runner in ``setup_output_dir``)."""
    path = registry.get_path("result_dir")
    if not path:
        raise RuntimeError("registry path 'result_dir' is not set: run through a LAVIS runner, or call "
                           "lavis.common.registry.registry.register_path('result_dir', <dir>) first")
    os.makedirs(path, exist_ok=True)
    return path


def output_dir():
    """Registry path ``output_dir``; falls back to ``result_dir`` when unset."""
    path = registry.get_path("output_dir") or result_dir()
    os.makedirs(path, exist_ok=True)
    return path


def gather_results(results, filename, dedup_key=None):
    """Merge every rank's results with LAVIS's ``save_result`` into ``<result_dir>/<filename>.json``.

    Returns the merged list on the main process (deduplicated on ``dedup_key``, first kept: a
    DistributedSampler pads the last batch with repeats), and None on the other ranks. Works without
    torch.distributed initialised (one rank).
    """
    path = BaseTask.save_result(results, result_dir(), filename, remove_duplicate="")
    if not is_main_process():
        return None
    with open(path) as f:
        merged = json.load(f)
    if dedup_key:
        seen, unique = set(), []
        for item in merged:
            key = json.dumps(item[dedup_key])  # hashable, and 5 differs from "5" as in the JSON
            if key not in seen:
                seen.add(key)
                unique.append(item)
        if len(unique) != len(merged):
            merged = unique
            with open(path, "w") as f:
                json.dump(merged, f)
    return merged


def write_metrics(split_name, metrics):
    """Write ``<output_dir>/<split>_metrics.json`` (latest) and append ``{split: metrics}`` to
    ``<output_dir>/evaluate.txt`` (the history, as LAVIS's tasks do). Returns the JSON path."""
    out = output_dir()
    path = os.path.join(out, f"{split_name}_metrics.json")
    with open(path, "w") as f:
        json.dump(metrics, f, indent=2)
    with open(os.path.join(out, "evaluate.txt"), "a") as f:
        f.write(json.dumps({split_name: metrics}) + "\n")
    return path
