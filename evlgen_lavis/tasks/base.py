"""What EVLGen's evaluation tasks share on top of LAVIS's task classes."""
from evlgen_lavis.tasks.ground_truth import AnnotationSources


def model_on_cuda(model):
    """True when the model's first parameter lives on a CUDA device (False for parameter-less models)."""
    parameters = getattr(model, "parameters", None)
    first = next(iter(parameters()), None) if callable(parameters) else None
    return first is not None and first.is_cuda


class OfflineEvalMixin:
    """Mixed in before a LAVIS task class. Keeps :class:`AnnotationSources` for the ground truth, and
    fixes two things LAVIS assumes: ``BaseTask.evaluation`` moves every batch to CUDA unless told
    otherwise (the runner never tells it), and ``before_evaluation`` requires the model to define
    ``before_evaluation``."""

    def _init_sources(self, datasets_cfg):
        self.sources = AnnotationSources(datasets_cfg)

    def build_datasets(self, cfg):
        datasets = super().build_datasets(cfg)
        self.sources.add_datasets(datasets)
        return datasets

    def before_evaluation(self, model, dataset, **kwargs):
        self.sources.current = dataset
        if hasattr(model, "before_evaluation"):
            model.before_evaluation(dataset=dataset, task_type=type(self))

    def evaluation(self, model, data_loader, cuda_enabled=None):
        """LAVIS's evaluation loop; batches go to CUDA only when the model is there
        (``cuda_enabled=None``), or as the caller says."""
        if cuda_enabled is None:
            cuda_enabled = model_on_cuda(model)
        return super().evaluation(model, data_loader, cuda_enabled=cuda_enabled)
