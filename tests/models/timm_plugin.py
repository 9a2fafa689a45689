"""pytest plugin: run timm's own tests/test_models.py against the mdeq_* models only.

Loaded with ``-p tests.models.timm_plugin`` before the test module is imported: it registers the models
(import mdeq) and narrows timm's model listings, which the test file uses at import time to parametrize.
``$MDEQ_TIMM_MODELS`` (comma-separated architecture names) narrows them further to those architectures (with
every pretrained tag of theirs). ``$MDEQ_TIMM_MAX_ITER`` gives every model timm's tests create that forward and
backward solver budget: the generic tests check the API's contract (shapes, taps, pruning, gradients reaching every
parameter), which holds at any budget, and a dozen solves of mdeq_xl at the presets' budgets took minutes.
"""
import fnmatch
import os

import timm
import timm.models
import timm.models._registry as registry

import mdeq  # noqa: F401  (registers mdeq_*)

_list_models = registry.list_models
_create_model = timm.create_model
_ONLY = [n for n in os.environ.get("MDEQ_TIMM_MODELS", "").split(",") if n]
_MAX_ITER = int(os.environ.get("MDEQ_TIMM_MAX_ITER") or 0)


def _mdeq_only(filter="", module="", pretrained=False, exclude_filters="", name_matches_cfg=False,
               include_tags=None):
    if pretrained:
        return []  # nothing is downloadable offline
    names = _list_models("mdeq*", exclude_filters=exclude_filters, name_matches_cfg=name_matches_cfg,
                         include_tags=include_tags)
    if _ONLY:
        names = [n for n in names if n.split(".")[0] in _ONLY]
    filters = [filter] if isinstance(filter, str) else list(filter)
    filters = [f for f in filters if f]
    if filters:  # model-specific tests name other architectures: keep only mdeq matches
        names = [n for n in names if any(fnmatch.fnmatch(n, f) for f in filters)]
    return names


def _create_with_budget(model_name, *args, **kwargs):
    if _MAX_ITER and str(model_name).startswith("mdeq"):
        kwargs["deq"] = {**kwargs.get("deq", {}), "max_iter": _MAX_ITER, "b_max_iter": _MAX_ITER}
    return _create_model(model_name, *args, **kwargs)


for target in (timm, timm.models, registry):
    target.list_models = _mdeq_only
    target.list_pretrained = lambda *a, **k: []
for target in (timm, timm.models):
    target.create_model = _create_with_budget
