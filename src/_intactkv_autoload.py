"""Applying IntactKV checkpoints in every Python process where intactkv-modifier is installed, with no import.

A checkpoint's intact prefix is applied by a wrapper around
``PreTrainedModel.from_pretrained``. Before this module existed the wrapper came
with ``import intactkv_modifier``, so every program that did not import the
package (lm-eval's ``hf`` backend, pipelines, servers, user scripts) got the
plain quantized model, silently. Now ``intactkv-modifier-autoload.pth``, which the
package installs into site-packages, runs :func:`arm` at interpreter start
(unless ``INTACTKV_AUTOLOAD=0``: the ``.pth`` line checks it before importing
anything of ours).

What happens when, and why it costs (almost) nothing:

- at interpreter start, this module (only ``sys``) is imported and a finder is
  put on ``sys.meta_path``; it recognises one module name and finds nothing else;
- when ``transformers.modeling_utils`` is imported (the module that defines
  ``PreTrainedModel``, which every ``from_pretrained`` goes through), the finder
  lets the real loader run it, then wraps ``from_pretrained`` and goes inert; a
  process that never loads a transformers model never gets this far;
- only when a loaded model's config carries ``intactkv_config`` does the wrapper
  import :mod:`intactkv_modifier.loading`, which applies the prefix or raises
  with the reason. Loading any other model imports nothing of ours and prints
  nothing, so a vLLM process (which imports transformers but builds its models
  itself) is left as it was.

Why a ``.pth`` file: transformers and compressed-tensors have no loading
extension point that an installed package can register with (no entry points;
a config's ``auto_map`` needs ``trust_remote_code=True`` from every caller and
replaces the model class). Why a top-level module: importing anything inside
``intactkv_modifier`` runs the package's ``__init__``, which imports
llm-compressor, seconds of work that no interpreter start may pay.

Standard library only, and as little of it as possible: this runs in every
Python process of the environment.
"""

from __future__ import annotations

import sys

TYPE_CHECKING = False  # typing itself is not imported at interpreter start, and costs milliseconds
if TYPE_CHECKING:
    from typing import Any

__all__ = ["AUTOLOAD_ENV", "CONFIG_KEY", "TRIGGER", "arm", "install"]

#: ``0`` (or ``false``, ``no``, ``off``) keeps the hook off; the ``.pth`` line reads it before importing this module.
AUTOLOAD_ENV = "INTACTKV_AUTOLOAD"
#: The module whose import arms the wrapper: it defines ``PreTrainedModel``.
TRIGGER = "transformers.modeling_utils"
#: ``intactkv_modifier.config.CONFIG_KEY``, repeated so that no package import is needed (a test keeps them equal).
CONFIG_KEY = "intactkv_config"
#: Set on the wrapper so that arming twice (the ``.pth`` and ``import intactkv_modifier``) wraps once.
_MARK = "_intactkv_loading_hook"


def arm() -> None:
    """Make ``from_pretrained`` apply IntactKV prefixes: now if transformers' models are loaded, else once they are."""
    modeling = sys.modules.get(TRIGGER)
    if modeling is not None and hasattr(modeling, "PreTrainedModel"):
        install(modeling.PreTrainedModel)
    elif not any(isinstance(finder, _Watcher) and not finder.answered for finder in sys.meta_path):
        sys.meta_path.insert(0, _Watcher())


def install(pretrained_model: type) -> None:
    """Wrap ``pretrained_model.from_pretrained``, once; the wrapper imports our package only for IntactKV models."""
    original = pretrained_model.from_pretrained.__func__  # type: ignore[attr-defined]
    if getattr(original, _MARK, False):
        return
    import functools  # not imported at interpreter start; transformers has imported it by now

    @functools.wraps(original)
    def from_pretrained(cls: type, pretrained_model_name_or_path: Any, *model_args: Any, **kwargs: Any) -> Any:
        loaded = original(cls, pretrained_model_name_or_path, *model_args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # output_loading_info=True adds a dict
        if getattr(getattr(model, "config", None), CONFIG_KEY, None) is not None:
            from intactkv_modifier.loading import apply_stored_prefix

            apply_stored_prefix(model, pretrained_model_name_or_path, kwargs)
        return loaded

    setattr(from_pretrained, _MARK, True)
    pretrained_model.from_pretrained = classmethod(from_pretrained)  # type: ignore[attr-defined]


class _Watcher:
    """A ``sys.meta_path`` finder that finds nothing itself: for :data:`TRIGGER` it returns the spec the other
    finders give, with a loader that runs :func:`install` once the module has executed.

    It answers once, then stays on ``sys.meta_path`` inert (one string comparison per import) rather than leaving
    it: another thread may be iterating that list, and removing an entry would make it skip the next finder.
    """

    def __init__(self) -> None:
        self.answered = False

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != TRIGGER or self.answered:
            return None
        self.answered = True
        for finder in sys.meta_path:
            find_spec = None if finder is self else getattr(finder, "find_spec", None)
            spec = None if find_spec is None else find_spec(fullname, path, target)
            if spec is not None:
                if hasattr(spec.loader, "exec_module"):
                    spec.loader = _InstallAfter(spec.loader)
                return spec
        return None


class _InstallAfter:
    """The real loader of :data:`TRIGGER`, followed by :func:`install`. The module sees its real loader."""

    def __init__(self, loader: Any):
        self.loader = loader

    def create_module(self, spec: Any) -> Any:
        return self.loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        module.__loader__ = self.loader
        if getattr(module, "__spec__", None) is not None:
            module.__spec__.loader = self.loader
        self.loader.exec_module(module)
        try:
            install(module.PreTrainedModel)
        except Exception as error:  # never break transformers' own import; say what is lost instead
            import warnings

            warnings.warn(
                f"intactkv-modifier could not wrap transformers' from_pretrained ({error!r}): IntactKV checkpoints "
                "load without their prefix unless the program runs `import intactkv_modifier`.",
                RuntimeWarning,
                stacklevel=2,
            )

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)
