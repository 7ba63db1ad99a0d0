"""Installing the package is enough: programs that never import it load IntactKV checkpoints with their prefix.

Every test that matters runs a fresh interpreter of this environment (where the
package is installed, editable or not), because the pytest process itself has
imported the package, which arms the hook on its own.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
import torch
from tiny_models import BOS, load, load_tokenizer, run_python
from transformers import PreTrainedModel

import _intactkv_autoload
from _intactkv_autoload import AUTOLOAD_ENV
from intactkv_modifier import attach_intact_kv, capture_prefix_kv, intact_kv_disabled
from intactkv_modifier.config import CONFIG_KEY

PTH = "intactkv-modifier-autoload.pth"
#: A prompt that starts with the prefix ([BOS]), as lm-eval's requests for this tokenizer do.
PROMPT = [BOS, 14, 25, 7, 40, 33]
#: How much more a bare interpreter start may take with the hook armed (the issue's goal).
START_BUDGET_S = 0.020


def _environment(**changes: str | None) -> dict[str, str]:
    """This process's environment with ``changes`` (``None`` removes a variable); the hook always on by default."""
    env = {name: value for name, value in os.environ.items() if name != AUTOLOAD_ENV}
    for name, value in changes.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


def _python(code: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=env or _environment(), timeout=300
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def _result(completed: subprocess.CompletedProcess[str]) -> dict:
    line = next(row for row in completed.stdout.splitlines() if row.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


@pytest.fixture(scope="module")
def intactkv_checkpoint(tiny_model_dirs, tmp_path_factory) -> tuple[PreTrainedModel, Path]:
    """A prefix that differs from the model's own [BOS] K/V (values x3), so IntactKV visibly changes the logits."""
    model = load(tiny_model_dirs["llama"])
    prefix = capture_prefix_kv(model, [BOS])
    prefix.values = [value * 3.0 for value in prefix.values]
    attach_intact_kv(model, [BOS], prefix)
    out = tmp_path_factory.mktemp("autoload") / "llama-intactkv"
    model.save_pretrained(out)
    load_tokenizer(tiny_model_dirs["llama"]).save_pretrained(out)
    return model, out


def _logits(model: PreTrainedModel, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0]


# ---------------------------------------------------------------------------------------------- installation


def _installed_pth() -> Path:
    try:
        distribution = importlib.metadata.distribution("intactkv-modifier")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("intactkv-modifier is not installed in this environment (run scripts/setup.sh)")
    recorded = [file for file in distribution.files or () if file.name == PTH]
    assert recorded, f"the installed distribution lacks {PTH}: the build hook in setup.py did not run"
    return Path(distribution.locate_file(recorded[0]))


def test_the_install_puts_the_startup_hook_at_the_top_of_site_packages():
    """Python runs .pth files only from a site directory itself, for wheel and editable installs alike."""
    pth = _installed_pth()
    assert pth.is_file() and str(pth.parent) in sys.path
    assert pth.read_text() == (Path(__file__).parents[1] / "src" / PTH).read_text()


def test_the_pth_line_reads_the_opt_out_before_importing_anything_of_ours():
    lines = [line for line in (Path(__file__).parents[1] / "src" / PTH).read_text().splitlines() if line]
    code = [line for line in lines if not line.startswith("#")]
    assert len(code) == 1 and code[0].startswith("import os;")
    assert code[0].index(AUTOLOAD_ENV) < code[0].index("_intactkv_autoload")


_ARMED = r"""
import json, sys
print("RESULT " + json.dumps({
    "armed": any(type(finder).__name__ == "_Watcher" and not finder.answered for finder in sys.meta_path),
    "imported": "_intactkv_autoload" in sys.modules,
}))
"""


@pytest.mark.parametrize(("value", "armed"), [(None, True), ("1", True), ("0", False), ("off", False),
                                              (" False ", False), ("no", False)])
def test_the_opt_out_variable_leaves_interpreter_start_untouched(value, armed):
    _installed_pth()
    report = _result(_python(_ARMED, env=_environment(**{AUTOLOAD_ENV: value})))
    assert report == {"armed": armed, "imported": armed}


def test_the_hook_and_the_package_name_the_same_config_block():
    assert _intactkv_autoload.CONFIG_KEY == CONFIG_KEY


# ---------------------------------------------------------------------------------------------- loading without import

_LOAD = r"""
import json, sys
import torch
from transformers import AutoModelForCausalLM

model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32, attn_implementation="eager").eval()
with torch.no_grad():
    logits = model(input_ids=torch.tensor([json.loads(sys.argv[2])])).logits[0]
torch.save(logits, sys.argv[3])
print("RESULT " + json.dumps({"package_imported": "intactkv_modifier" in sys.modules}))
"""


def test_a_program_that_never_imports_the_package_gets_the_intactkv_logits(intactkv_checkpoint, tmp_path):
    _installed_pth()
    model, out = intactkv_checkpoint
    expected = _logits(model, PROMPT)
    with intact_kv_disabled(model):
        plain = _logits(model, PROMPT)
    assert (expected - plain).abs().max() > 1e-2  # the prefix matters on this prompt

    report = _result(_python(_LOAD, str(out), json.dumps(PROMPT), str(tmp_path / "on.pt")))
    assert report == {"package_imported": True}
    torch.testing.assert_close(torch.load(tmp_path / "on.pt"), expected, rtol=0, atol=1e-5)

    report = _result(_python(_LOAD, str(out), json.dumps(PROMPT), str(tmp_path / "off.pt"),
                             env=_environment(**{AUTOLOAD_ENV: "0"})))
    assert report == {"package_imported": False}
    torch.testing.assert_close(torch.load(tmp_path / "off.pt"), plain, rtol=0, atol=1e-5)


_OTHER_MODELS = r"""
import json, logging, sys
sys.modules["llmcompressor"] = None  # as in a vLLM environment: llm-compressor is not installed
# transformers imports torchao where it is installed (the `torchao` extra), which logs at import: not ours
for library_logger in ("torchao", "torch.utils._pytree"):
    logging.getLogger(library_logger).setLevel(logging.ERROR)
import torch, transformers.modeling_utils as modeling
from transformers import AutoModelForCausalLM

watching = any(type(finder).__name__ == "_Watcher" and not finder.answered for finder in sys.meta_path)
AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
plain_model = {"package_imported": "intactkv_modifier" in sys.modules}
model = AutoModelForCausalLM.from_pretrained(sys.argv[2], dtype=torch.float32)
print("RESULT " + json.dumps({
    "watching_after_transformers": watching,
    "real_loader": type(modeling.__loader__).__name__,
    "spec_loader": type(modeling.__spec__.loader).__name__,
    "plain_model": plain_model,
    "prefix_applied": hasattr(model.model.layers[0].self_attn, "intact_key"),
    "llmcompressor_loaded": sys.modules.get("llmcompressor") is not None,
}))
"""


def test_other_models_load_untouched_and_silent_and_prefixes_need_no_llm_compressor(
    intactkv_checkpoint, tiny_model_dirs
):
    """What a vLLM process sees: transformers imported, no llm-compressor, nothing of ours printed or imported."""
    _installed_pth()
    _, out = intactkv_checkpoint
    quiet = _environment(HF_HUB_DISABLE_PROGRESS_BARS="1", TRANSFORMERS_VERBOSITY="error")
    completed = _python(_OTHER_MODELS, str(tiny_model_dirs["llama"]), str(out), env=quiet)
    assert _result(completed) == {
        "watching_after_transformers": False,  # it went inert once transformers' models were loaded
        "real_loader": "SourceFileLoader",
        "spec_loader": "SourceFileLoader",
        "plain_model": {"package_imported": False},
        "prefix_applied": True,
        "llmcompressor_loaded": False,
    }
    assert completed.stdout.splitlines() == [next(r for r in completed.stdout.splitlines() if r.startswith("RESULT"))]
    assert completed.stderr == ""


def test_arming_again_wraps_from_pretrained_once():
    _intactkv_autoload.arm()
    _intactkv_autoload.install(PreTrainedModel)
    wrapper = PreTrainedModel.from_pretrained.__func__
    assert getattr(wrapper, "_intactkv_loading_hook", False)
    assert not getattr(wrapper.__wrapped__, "_intactkv_loading_hook", False)


def test_the_watcher_answers_once_with_the_real_loader_then_stays_inert(monkeypatch):
    """Staying on sys.meta_path (inert) is deliberate: removing it could make a concurrent import skip a finder."""
    name = "colorsys"  # a small standard module that stands in for transformers.modeling_utils
    monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setattr(_intactkv_autoload, "TRIGGER", name)
    watcher = _intactkv_autoload._Watcher()
    monkeypatch.setattr(sys, "meta_path", [watcher, *sys.meta_path])
    with pytest.warns(RuntimeWarning, match="could not wrap"):  # colorsys has no PreTrainedModel to wrap
        module = importlib.import_module(name)
    assert type(module.__loader__).__name__ == "SourceFileLoader" and module.__spec__.loader is module.__loader__
    assert watcher.answered and watcher in sys.meta_path and watcher.find_spec(name) is None


def test_a_hook_that_cannot_install_warns_and_never_breaks_the_import():
    """Should transformers rename PreTrainedModel, its import must still succeed, and say what is lost."""
    module = ModuleType("transformers_without_pretrained_model")
    loader = _intactkv_autoload._InstallAfter(SimpleNamespace(exec_module=lambda module: None))
    module.__spec__ = SimpleNamespace(loader=loader)
    with pytest.warns(RuntimeWarning, match="IntactKV checkpoints load without their prefix"):
        loader.exec_module(module)
    assert module.__loader__ is loader.loader and module.__spec__.loader is loader.loader


# ---------------------------------------------------------------------------------------------- start-up cost


def _start_seconds(env: dict[str, str], runs: int) -> float:
    """Median wall time of ``python -c pass``: what every process of the environment pays at start."""
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], env=env, check=True)
        times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2]


def test_interpreter_start_costs_under_20_ms_more_with_the_hook_armed():
    _installed_pth()
    armed = _environment(PYTHONDONTWRITEBYTECODE=None)  # bytecode cached, as an installed wheel has it
    off = _environment(PYTHONDONTWRITEBYTECODE=None, **{AUTOLOAD_ENV: "0"})
    _start_seconds(armed, 1)  # writes the module's bytecode
    on_times, off_times = [], []
    for _ in range(3):  # interleaved, so that load from other jobs hits both alike
        on_times.append(_start_seconds(armed, 7))
        off_times.append(_start_seconds(off, 7))
    overhead = min(on_times) - min(off_times)
    print(f"interpreter start: armed {min(on_times) * 1e3:.1f} ms, off {min(off_times) * 1e3:.1f} ms")
    assert overhead < START_BUDGET_S


def test_the_hook_imports_only_its_own_small_module_at_start():
    _installed_pth()
    completed = subprocess.run([sys.executable, "-X", "importtime", "-c", "pass"], capture_output=True, text=True,
                               env=_environment(), check=True)
    modules = {line.split("|")[-1].strip() for line in completed.stderr.splitlines() if "|" in line}
    off = subprocess.run([sys.executable, "-X", "importtime", "-c", "pass"], capture_output=True, text=True,
                         env=_environment(**{AUTOLOAD_ENV: "0"}), check=True)
    baseline = {line.split("|")[-1].strip() for line in off.stderr.splitlines() if "|" in line}
    assert modules - baseline <= {"_intactkv_autoload", "__future__"}


# ---------------------------------------------------------------------------------------------- lm-eval

_HFLM = r"""
import json, sys
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM

lm = HFLM(pretrained=sys.argv[1], device="cpu", dtype="float32", batch_size=1)
request = Instance(request_type="loglikelihood", doc={}, arguments=(sys.argv[2], sys.argv[3]), idx=0)
(loglikelihood, _), = lm.loglikelihood([request], disable_tqdm=True)
print("RESULT " + json.dumps({"loglikelihood": loglikelihood}))
"""


def _continuation_loglikelihood(model: PreTrainedModel, context: list[int], continuation: list[int]) -> float:
    logits = _logits(model, context + continuation).log_softmax(-1)
    positions = range(len(context) - 1, len(context) + len(continuation) - 1)
    return sum(float(logits[position, token]) for position, token in zip(positions, continuation))


def test_lm_eval_hf_backend_built_from_a_path_scores_with_the_prefix(intactkv_checkpoint):
    """``lm_eval --model hf --model_args pretrained=CKPT``: HFLM loads the path itself, never importing us."""
    pytest.importorskip("lm_eval", reason="lm-eval is not installed: pip install -e '.[lm-eval]'")
    _installed_pth()
    model, out = intactkv_checkpoint
    tokenizer = load_tokenizer(out)
    context, continuation = "w12 w23 w5 w38", " w31 w7"
    context_ids = tokenizer(context)["input_ids"]
    continuation_ids = tokenizer(context + continuation)["input_ids"][len(context_ids) :]
    assert context_ids[0] == BOS  # lm-eval keeps the tokenizer's own special tokens: its requests start with [BOS]
    expected = _continuation_loglikelihood(model, context_ids, continuation_ids)
    with intact_kv_disabled(model):
        plain = _continuation_loglikelihood(model, context_ids, continuation_ids)
    assert abs(expected - plain) > 1e-2

    report = run_python(_HFLM, str(out), context, continuation, env=_environment())
    assert report["loglikelihood"] == pytest.approx(expected, abs=1e-4)
