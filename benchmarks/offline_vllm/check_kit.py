"""Check the offline vLLM 0.26.0 kit in the interpreter that runs it (the GPU image's python3).

    python3 check_kit.py            # versions, requirement floors against the image, imports, GPU facts, plugin
    python3 check_kit.py --smoke    # + LLM(...) on models/pivot-llama: FLASH/TRITON/FLEX attention, TP 1 (and 2)
    python3 check_kit.py --serve    # + python -m vllm.entrypoints.openai.api_server, one request on 127.0.0.1

Run from the repository root (models/pivot-llama is tracked there). Exit status 1 if a required check fails.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import json
import subprocess
import sys
import time
from pathlib import Path

KIT = {  # the wheels of the kit, exact versions
    "vllm": "0.26.0",
    "annotated-types": "0.8.0", "apache-tvm-ffi": "0.1.10", "cachetools": "7.1.6", "cbor2": "6.1.3",
    "compressed-tensors": "0.19.0", "datasets": "5.2.0", "dill": "0.4.1", "distro": "1.9.0",
    "fastapi": "0.136.3", "gguf": "0.19.0", "interegular": "0.3.3", "jmespath": "1.1.0",
    "llguidance": "1.7.6", "llmcompressor": "0.14.0.1", "lm-format-enforcer": "0.11.3", "loguru": "0.7.3",
    "model-hosting-container-standards": "0.1.16", "msgspec": "0.21.1", "multiprocess": "0.70.19",
    "openai": "2.50.0", "openai-harmony": "0.0.8", "partial-json-parser": "0.2.1.1.post7",
    "prometheus-fastapi-instrumentator": "8.1.0", "pybase64": "1.4.3", "pydantic": "2.13.4",
    "pydantic-core": "2.46.4", "pyzmq": "27.1.0", "sniffio": "1.3.1", "starlette": "1.3.1",
    "typing-inspection": "0.4.2", "uvicorn": "0.52.0", "watchfiles": "1.2.0", "xgrammar": "0.2.3",
}
# requirements knowingly left out (not imported on the paths the kit is for); reported, not failed
LEFT_OUT = {
    "vllm": {"blake3", "setproctitle", "jsonschema", "outlines-core", "lark", "mistral-common", "depyf", "ijson",
             "python-json-logger", "anthropic", "mcp", "opentelemetry-sdk", "opentelemetry-api",
             "opentelemetry-exporter-otlp", "opentelemetry-semantic-conventions-ai", "torchcodec", "pynvvideocodec",
             "flashinfer-python", "tilelang", "nvidia-cudnn-frontend", "nvtx", "fastsafetensors", "nvidia-cutlass-dsl",
             "quack-kernels", "tokenspeed-mla", "humming-kernels", "numba", "compressed-tensors"},
    "openai": {"jiter"}, "llmcompressor": {"auto-round"}, "model-hosting-container-standards": {"supervisor"},
    "fastapi": set(), "datasets": set(),
}
IMPORTS = [
    "vllm", "vllm.entrypoints.llm", "vllm.v1.engine.core", "vllm.v1.engine.core_client", "vllm.v1.engine.llm_engine",
    "vllm.v1.worker.gpu_worker", "vllm.v1.worker.gpu_model_runner", "vllm.v1.attention.backends.flash_attn",
    "vllm.v1.attention.backends.triton_attn", "vllm.v1.attention.backends.flex_attention",
    "vllm.entrypoints.openai.api_server", "vllm.v1.executor.multiproc_executor",
    "vllm.distributed.kv_transfer.kv_connector.v1.base", "vllm.model_executor.models.llama",
    "vllm.model_executor.models.gemma3",
    "vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors",
    "vllm.v1.structured_output.backend_xgrammar", "vllm.v1.structured_output.backend_guidance",
    "vllm.v1.structured_output.backend_lm_format_enforcer", "vllm.entrypoints.serve.instrumentator.metrics",
    "llmcompressor", "llmcompressor.modifiers.quantization", "compressed_tensors", "compressed_tensors.offload",
    "gguf", "loguru", "pydantic", "intactkv_modifier", "intactkv_modifier.serving.vllm_plugin",
]
MODEL = "models/pivot-llama"  # tracked Llama (6 layers, 6 q / 2 kv heads, head_dim 64): TP 2 divides its kv heads

failures: list[str] = []


def norm(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def fail(msg: str) -> None:
    failures.append(msg)
    print("FAIL", msg)


def check_versions() -> None:
    print("== kit versions")
    for name, want in KIT.items():
        try:
            got = md.version(name)
        except md.PackageNotFoundError:
            fail(f"{name}=={want} not installed")
            continue
        (print if got == want else fail)(f"{name} {got}" + ("" if got == want else f" (kit has {want})"))
    # one distribution of each name only
    seen: dict[str, list[str]] = {}
    for d in md.distributions():
        seen.setdefault(norm(d.metadata["Name"]), []).append(d.version)
    for n, vs in seen.items():
        if len(vs) > 1:
            fail(f"two versions of {n} installed: {vs}")


def check_requirements() -> None:
    """The kit's wheels were installed with --no-deps: compare their floors with what the image has."""
    from packaging.requirements import Requirement

    print("== requirements of kit wheels against this interpreter (version mismatches are the real risk)")
    for name in KIT:
        try:
            reqs = md.requires(name) or []
        except md.PackageNotFoundError:
            continue
        for line in reqs:
            r = Requirement(line)
            if r.marker is not None and not r.marker.evaluate({"extra": ""}):
                continue
            try:
                got = md.version(r.name)
            except md.PackageNotFoundError:
                if norm(r.name) in {norm(x) for x in LEFT_OUT.get(name, set())} or name == "vllm":
                    print(f"  info: {name} lists {r} - not installed (left out on purpose)")
                else:
                    print(f"  WARN: {name} needs {r} - not installed")
                continue
            if r.specifier and not r.specifier.contains(got, prereleases=True):
                known = {("vllm", "compressed-tensors"), ("vllm", "numba")}  # overridden on purpose (README)
                level = "info" if (name, norm(r.name)) in known else "WARN"
                print(f"  {level}: {name} needs {r}, this interpreter has {r.name} {got}")


def check_imports() -> None:
    print("== imports")
    for m in IMPORTS:
        try:
            importlib.import_module(m)
            print("OK  ", m)
        except BaseException as e:  # noqa: BLE001
            fail(f"import {m}: {type(e).__name__}: {str(e)[:300]}")


def check_gpu() -> None:
    print("== GPU facts")
    try:
        import torch
        from vllm.platforms import current_platform

        print("torch", torch.__version__, "cuda", torch.version.cuda, "devices", torch.cuda.device_count())
        print("vllm platform", type(current_platform).__name__, "is_cuda", current_platform.is_cuda())
        if not current_platform.is_cuda():
            fail("vLLM did not detect CUDA")
            return
        print("capability", current_platform.get_device_capability())
        current_platform.import_kernels()  # vllm._C and vllm._moe_C
        print("vllm kernels loaded")
        from vllm.vllm_flash_attn.flash_attn_interface import fa_version_unsupported_reason, is_fa_version_supported

        for v in (2, 3):
            print(f"FA{v} supported: {is_fa_version_supported(v)} {fa_version_unsupported_reason(v) or ''}")
    except BaseException as e:  # noqa: BLE001
        fail(f"GPU facts: {type(e).__name__}: {str(e)[:300]}")


def check_plugin() -> None:
    print("== vllm.general_plugins entry points")
    eps = [f"{e.name} = {e.value}" for e in md.entry_points(group="vllm.general_plugins")]
    print(eps)
    if not any(e.startswith("intactkv ") for e in eps):
        fail("intactkv plugin entry point missing: pip install --no-deps --no-build-isolation -e . in the repo root")


SMOKE_CHILD = r"""
import sys, time
from vllm import LLM, SamplingParams
be, tp = sys.argv[1], int(sys.argv[2])
if __name__ == "__main__":
    t = time.time()
    llm = LLM(model=sys.argv[3], dtype="bfloat16", enforce_eager=True, tensor_parallel_size=tp,
              attention_backend=be, gpu_memory_utilization=0.3, max_model_len=512)
    out = llm.generate(["The capital of France is"], SamplingParams(max_tokens=8, temperature=0.0))
    print("SMOKE-OK", be, tp, repr(out[0].outputs[0].text), f"{time.time() - t:.0f}s", flush=True)
"""


def smoke() -> None:
    import torch

    print("== LLM(...) smoke runs on", MODEL)
    tps = [1, 2] if torch.cuda.device_count() >= 2 else [1]
    for tp in tps:
        for be in ("FLASH_ATTN", "TRITON_ATTN", "FLEX_ATTENTION"):
            p = subprocess.run([sys.executable, "-c", SMOKE_CHILD, be, str(tp), MODEL], capture_output=True, text=True,
                               timeout=600)
            line = [x for x in p.stdout.splitlines() if x.startswith("SMOKE-OK")]
            if p.returncode == 0 and line:
                print(line[0])
            else:
                fail(f"LLM {be} TP{tp}: rc={p.returncode}\n{(p.stdout + p.stderr)[-3000:]}")


def serve() -> None:
    import urllib.request

    print("== api_server on 127.0.0.1:8011")
    log_path = Path("/tmp/kit_api_server.log")
    with log_path.open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", MODEL,
                                 "--dtype", "bfloat16", "--enforce-eager", "--host", "127.0.0.1", "--port", "8011",
                                 "--gpu-memory-utilization", "0.3", "--max-model-len", "512"], stdout=log, stderr=log)
    try:
        for _ in range(240):
            if proc.poll() is not None:
                break
            try:
                urllib.request.urlopen("http://127.0.0.1:8011/v1/models", timeout=2).read()
                break
            except OSError:
                time.sleep(1)
        body = json.dumps({"model": MODEL, "prompt": "The capital of France is", "max_tokens": 8}).encode()
        req = urllib.request.Request("http://127.0.0.1:8011/v1/completions", body, {"Content-Type": "application/json"})
        print("SERVE-OK", json.loads(urllib.request.urlopen(req, timeout=60).read())["choices"][0]["text"])
    except BaseException as e:  # noqa: BLE001
        fail(f"api_server: {type(e).__name__}: {e}; log tail:\n" + log_path.read_text()[-3000:])
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


if __name__ == "__main__":
    print("python", sys.executable, sys.version.split()[0])
    check_versions()
    check_requirements()
    check_imports()
    check_gpu()
    check_plugin()
    if "--smoke" in sys.argv:
        smoke()
    if "--serve" in sys.argv:
        serve()
    print(f"== {len(failures)} failure(s)")
    sys.exit(1 if failures else 0)
