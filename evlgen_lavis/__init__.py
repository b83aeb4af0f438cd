"""EVLGen as a LAVIS plugin.

``import evlgen_lavis`` registers EVLGen's models, processors, dataset builders, tasks and runner into
``lavis.common.registry``. Importing it again is harmless: Python caches the module, and every
registration goes through :func:`evlgen_lavis.common.registry_once`.
"""

REQUIRED_LAVIS = "1.0.2"

_INSTALL_HINT = (
    "evlgen_lavis needs salesforce-lavis=={v} installed WITHOUT its dependencies (its metadata pins "
    "transformers<4.27, which cannot generate from inputs_embeds). Install the tested stack with "
    "`make install` from the repository root, or by hand: "
    "`pip install --no-deps salesforce-lavis=={v} && pip install -r requirements/base.txt`."
).format(v=REQUIRED_LAVIS)


def _check_lavis():
    try:
        from importlib.metadata import PackageNotFoundError, version
        try:
            found = version("salesforce-lavis")
        except PackageNotFoundError:
            raise ImportError("salesforce-lavis is not installed. " + _INSTALL_HINT) from None
        if found != REQUIRED_LAVIS:
            raise ImportError(
                f"salesforce-lavis {found} is installed, but evlgen_lavis is tested with "
                f"{REQUIRED_LAVIS} only. " + _INSTALL_HINT
            )
        import lavis  # noqa: F401
    except ImportError as err:
        if "salesforce-lavis" in str(err):
            raise
        raise ImportError(f"`import lavis` failed ({err}). " + _INSTALL_HINT) from err


_check_lavis()

from evlgen_lavis import processors  # noqa: E402,F401
from evlgen_lavis import models  # noqa: E402,F401
from evlgen_lavis import datasets  # noqa: E402,F401
from evlgen_lavis import tasks  # noqa: E402,F401
from evlgen_lavis import runners  # noqa: E402,F401

__version__ = "0.1.0"
