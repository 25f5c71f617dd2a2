"""Compiled decode steps saved on disk, so that only a machine's first run traces and compiles one.

Inductor keeps its kernels in an on-disk cache, but not Dynamo's trace of the step: every new
process traces the whole decode step again (every layer's attention, cache appends and policy
update), which is most of a warm run's compile time on a 30-layer model. Here the step is
compiled ahead of time (``torch.compile(...).aot_compile``), saved with its guards and
loaded by later runs in seconds.

A saved step is used only where its guards accept the call: they check the tensors (shapes,
dtypes, the pools' block counts symbolic), the cache's and policy's settings and cormlm's
module-level constants (kernel choices, thresholds). Anything else, or a torch that cannot
save steps, takes ``torch.compile``'s path as before, for that cache. The file's name is a
digest of everything that shaped the trace and that the guards do not see (torch, cormlm's
source, the CPU, the model's shapes, the call's kind), so a changed library or machine
never loads a stale step. ``$CORMLM_COMPILE_CACHE`` names the folder (default
``$CORMLM_CACHE/compiled``); ``off`` turns saving and loading off.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import json
import os
import sys
import warnings
import weakref
from collections.abc import Callable
from pathlib import Path

import torch

from . import native
from .cache.ragged import RaggedCache

FORMAT = 2  # bump when what is saved, or how it is keyed, changes
OFF = ("off", "0", "false", "no")


def folder() -> Path | None:
    """Where saved steps live, or None when saving is off."""
    setting = os.environ.get("CORMLM_COMPILE_CACHE", "")
    if setting.lower() in OFF:
        return None
    if setting:
        return Path(setting).expanduser()
    from .checkpoint.real_model import cache_folder

    return cache_folder() / "compiled"


def supported() -> bool:
    """Whether this torch can compile a function ahead of time and load it in another process."""
    return hasattr(torch.compiler, "load_compiled_function") and hasattr(torch.compile(lambda: None), "aot_compile")


@functools.cache
def _source_digest() -> str:
    """cormlm's own source: a step traced from other code is another step."""
    digest = hashlib.sha256()
    root = Path(__file__).parent
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def step_key(model: torch.nn.Module, cache: object, args: tuple, options: dict[str, object] | None) -> str:
    """The saved step's file name for this model, cache and call (see the module's docstring)."""
    from .models import decode_block
    from .models.linear import graph_choices

    input_ids, _positions, _max_position, _cache, plain_causal, last_logits_only = args
    policy = cache.policy
    settings = sorted((name, repr(value)) for name, value in getattr(policy, "__dict__", {}).items()
                      if isinstance(value, (bool, int, float, str, tuple, type(None))))
    parts = [
        f"format {FORMAT}", f"torch {torch.__version__}", f"python {sys.version_info[:2]}", _source_digest(),
        native.cpu_signature(),
        f"threads {torch.get_num_threads()}", repr(model.config), f"{model.dtype} {model.device}",
        f"{type(model).__qualname__} {type(cache).__qualname__} {type(policy).__qualname__} {settings}",
        f"rows {tuple(input_ids.shape)} block {getattr(cache, 'block_size', None)} "
        f"query_group {cache.query_group is not None} {plain_causal} {last_logits_only}",
        repr(sorted((options or {}).items())), repr(sorted(graph_choices().items(), key=repr)),
        f"blocks {decode_block.graph_path} {sorted(decode_block.graph_choices().items(), key=repr)}",
    ]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]


def _keep_guard(entry) -> bool:
    """Which guards a saved step keeps: every local one that can be saved, and the global
    constants of cormlm's own modules (kernel choices, thresholds); other globals (builtins,
    torch's functions) cannot be looked up again in a new process."""
    from torch._dynamo.guards import CheckFunctionManager

    if entry.guard_type in CheckFunctionManager.UNSUPPORTED_SERIALIZATION_GUARD_TYPES:
        return False
    return not entry.is_global or (entry.name.startswith("G['__import_cormlm")
                                   and entry.guard_type in ("CONSTANT_MATCH", "EQUALS_MATCH"))


def _is_guard_refusal(error: RuntimeError) -> bool:
    return "GuardManager check failed" in str(error)


class SavedDecodeStep:
    """``model.compiled_decode``: the saved step where one fits the call, else ``fallback``
    (``torch.compile``'s graph). The first call with no saved step compiles one ahead of time
    and saves it; calls it refuses (its guards) go to ``fallback`` for the rest of that cache."""

    def __init__(self, model: torch.nn.Module, fallback: Callable, options: dict[str, object] | None,
                 where: Path, log: Callable[[str], None] | None = None) -> None:
        self.model, self.fallback, self.options, self.where = model, fallback, options, where
        self.log = log or (lambda message: None)
        self.steps: dict[str, Callable | None] = {}  # key -> saved step (None: none fits, or none could be made)
        # per cache and kind of call (rows, flags): the saved step, or None for torch.compile's
        self.chosen: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.loaded = self.saved = self.refusals = 0  # what happened, for tests and summaries

    def __call__(self, *args):
        cache = args[3]
        if not isinstance(cache, RaggedCache):  # another cache class: its tensors are its own to mark
            return self.fallback(*args)
        kinds = self.chosen.setdefault(cache, {})
        kind = (args[0].shape, args[4], args[5])
        if kind not in kinds:
            kinds[kind] = self._step(args)
            if kinds[kind] is not None:
                for pool in cache.pools:
                    pool.set_dynamic_marks(False)
        step = kinds[kind]
        if step is None:
            return self.fallback(*args)
        try:
            return step(self.model, *args)
        except RuntimeError as error:
            if not _is_guard_refusal(error):
                raise
        self.refusals += 1
        kinds[kind] = None  # this cache's later calls of this kind: torch.compile's
        for pool in cache.pools:
            pool.set_dynamic_marks(True)
        self.log("cormlm: the saved decode step does not fit this call; compiling it with torch.compile")
        return self.fallback(*args)

    def _step(self, args: tuple) -> Callable | None:
        key = step_key(self.model, args[3], args, self.options)
        if key not in self.steps:
            path = self.where / f"decode-{key}.pt2"
            step, stale = self._load(path) if path.is_file() else (None, False)
            if stale:  # a saved constant differs here: torch.compile's path, the file left for the runs it fits
                self.refusals += 1
                self.log(f"cormlm: the saved decode step {path.name} was traced with other module constants; "
                         "compiling it with torch.compile")
            elif step is None:
                step = self._compile_and_save(path, args)
            self.steps[key] = step
        return self.steps[key]

    def _load(self, path: Path) -> tuple[Callable | None, bool]:
        """The saved step (None if damaged), and whether cormlm's module constants it read
        differ here (its guards for them are rebuilt from this process's values: checked now)."""
        try:
            constants = json.loads(_constants_path(path).read_text(encoding="utf-8"))
            with open(path, "rb") as f:
                step = torch.compiler.load_compiled_function(f)
        except Exception as error:  # noqa: BLE001 - a damaged or foreign file: compile again and replace it
            warnings.warn(f"cormlm: could not load the saved decode step {path} ({type(error).__name__}: "
                          f"{str(error)[:200]}); compiling it again", RuntimeWarning, stacklevel=4)
            return None, False
        if any(_current(name) != value for name, value in constants.items()):
            return None, True
        self.loaded += 1
        self.log(f"cormlm: loaded the compiled decode step from {path}")
        return step, False

    def _compile_and_save(self, path: Path, args: tuple) -> Callable | None:
        from torch.fx.experimental import _config as fx_config

        self.log(f"cormlm: compiling the decode step ahead of time (once per machine; saved to {path.parent})")
        constants: dict[str, str] = {}

        def keep(entries) -> list[bool]:
            kept = [_keep_guard(entry) for entry in entries]
            constants.update({entry.name: repr(entry.value) for entry, k in zip(entries, kept)
                              if k and entry.is_global and entry.has_value})
            return kept

        # the saved guards' state takes the model along: not this wrapper, whose loaded steps cannot be pickled
        self.model.compiled_decode = None
        try:
            # duck sizing off: pools that share a size now must not share a symbol (they part later)
            with fx_config.patch(use_duck_shape=False):
                step = torch.compile(type(self.model).body, fullgraph=True,
                                     options={**(self.options or {}), "guard_filter_fn": keep}
                                     ).aot_compile(((self.model, *args), {}))
        except Exception as error:  # noqa: BLE001 - any refusal leaves torch.compile's path, which works
            warnings.warn(f"cormlm: the decode step could not be compiled ahead of time ({type(error).__name__}: "
                          f"{str(error)[:200]}); using torch.compile without saving it", RuntimeWarning, stacklevel=4)
            return None
        finally:
            self.model.compiled_decode = self
        try:
            _write_whole(_constants_path(path), lambda partial: partial.write_text(json.dumps(constants), encoding="utf-8"))
            _write_whole(path, lambda partial: step.save_compiled_function(str(partial)))
            self.saved += 1
        except OSError as error:
            warnings.warn(f"cormlm: could not save the compiled decode step to {path} ({error}); "
                          "later runs will compile it again", RuntimeWarning, stacklevel=4)
        return step


def _write_whole(path: Path, write: Callable[[Path], object]) -> None:
    """``write`` to a partial file beside ``path``, then rename it: whole or not at all, also
    with two processes saving at once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    write(partial)
    os.replace(partial, path)


def _constants_path(path: Path) -> Path:
    """Beside a saved step: the values of the cormlm module constants its trace read."""
    return path.with_name(path.name + ".constants.json")


class _Modules(dict):
    """The global scope a guard's name is written against: Dynamo's ``__import_a_dot_b`` names."""

    def __missing__(self, name: str) -> object:
        if not name.startswith("__import_"):
            raise KeyError(name)
        return importlib.import_module(name.removeprefix("__import_").replace("_dot_", "."))


def _current(name: str) -> str | None:
    """repr of what a saved guard's ``name`` (e.g. ``G['__import_cormlm_dot_x'].LIMIT``) holds now."""
    try:
        return repr(eval(name, {"G": _Modules(), "torch": torch, "__builtins__": {}}))  # noqa: S307 - our own guard names
    except Exception:  # noqa: BLE001 - gone or renamed: not the value it was
        return None


def _choices_path(model: torch.nn.Module, where: Path) -> Path:
    from .models.linear import CALIBRATION_ROWS, Linear

    shapes = sorted({(*m.weight.shape, str(m.weight.dtype), str(m.weight.device)) for m in model.modules()
                     if isinstance(m, Linear)})
    parts = [f"format {FORMAT}", f"torch {torch.__version__}", _source_digest(), native.cpu_signature(),
             f"threads {torch.get_num_threads()}", repr(shapes), repr(CALIBRATION_ROWS)]
    return where / f"kernels-{hashlib.sha256(chr(10).join(parts).encode()).hexdigest()[:24]}.json"


def calibrate_once(model: torch.nn.Module, where: Path | None) -> None:
    """``calibrate`` the model's compiled products and blocks, or take what an earlier run
    measured for the same shapes on this machine: the choices are part of the saved step's
    trace, and measurements on a busy machine differ from run to run (each would be a new step)."""
    from .models import decode_block
    from .models.linear import adopt_graph_choices, calibrate, graph_choices

    path = None if where is None else _choices_path(model, where)
    if path is not None and path.is_file():
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
            choices = {(int(out), int(inp), int(n), getattr(torch, dtype)): str(name)
                       for out, inp, n, dtype, name in saved["products"]}
            blocks = {(*map(int, key[:5]), tuple(map(bool, key[5])), int(key[6])): str(name)
                      for *key, name in saved["blocks"]}
        except (OSError, ValueError, TypeError, AttributeError, KeyError):
            choices = None  # damaged: measure again and replace it
        if choices is not None and adopt_graph_choices(choices):
            decode_block.adopt_choices(blocks)
            return
    calibrate(model)
    decode_block.calibrate(model)
    if path is None:
        return
    saved = {"products": [[out, inp, n, str(dtype).removeprefix("torch."), name]
                          for (out, inp, n, dtype), name in graph_choices().items()],
             "blocks": [[*key, name] for key, name in decode_block.measured_choices().items()]}
    try:
        _write_whole(path, lambda partial: partial.write_text(json.dumps(saved), encoding="utf-8"))
    except OSError as error:
        warnings.warn(f"cormlm: could not save the measured kernel choices to {path} ({error})",
                      RuntimeWarning, stacklevel=2)
