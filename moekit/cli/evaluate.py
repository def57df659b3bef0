"""`moekit eval` (lm-evaluation-harness in process, cost figures, perplexity) and `moekit compare`."""

from __future__ import annotations

from pathlib import Path

import typer

from moekit.cli import app
from moekit.cli.common import DEVICE, DEVICE_MAP, DTYPE, FIELD, MAX_MEMORY, MODEL, OFFLOAD, TRUST, load, option
from moekit.pipeline.recipe import EvalStep

TASKS_HELP = "comma-separated tasks: arc_easy, arc_challenge, piqa, openbookqa, social_iqa, hellaswag, winogrande, mmlu, kmmlu, click"


def _data_files(items: list[str] | None) -> dict | None:
    from moekit.errors import MoekitError

    if not items:
        return None
    out = {}
    for item in items:
        task, sep, path = item.partition("=")
        if not sep or not task or not path:
            raise MoekitError(f"--data-file '{item}' is not TASK=PATH: write e.g. --data-file arc_easy=my_arc.jsonl")
        out[task.strip()] = path.strip()
    return out


def _checkpoint_of(model: str) -> Path | None:
    """The directory a named model was loaded from, for its bytes on disk (never builds anything)."""
    from moekit.checkpoint.paths import cache_dir

    if model == "smollm2":
        from moekit.checkpoint.smollm2 import smollm2_path

        return smollm2_path()
    if model == "smollm2-moe":
        path = cache_dir("models") / "smollm2-moe"
        return path if path.is_dir() else None
    path = Path(model).expanduser()
    return path if path.is_dir() else None


@app.command("eval")
def eval_cmd(
    model: str = MODEL,
    tasks: str = typer.Option("arc_easy,openbookqa,social_iqa", "--tasks", help=TASKS_HELP),
    data_dir: Path = typer.Option(None, "--data-dir", help="folder with local copies (arc_easy.jsonl ...); default: the hub"),
    data_file: list[str] = typer.Option(None, "--data-file", help="TASK=PATH: one task's local file (repeatable)"),
    limit: int = option(EvalStep, "limit", "--limit", help="score only the first N items of each task"),
    batch_size: int = option(EvalStep, "batch_size", "--batch-size", help="sequences per forward pass"),
    num_fewshot: int = option(EvalStep, "num_fewshot", "--num-fewshot", help="in-context examples per item"),
    out: Path = typer.Option(None, "--out", help="result JSON (a Markdown table is written beside it, .md)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing --out"),
    backend: str = typer.Option("hf", "--backend", help="hf: in process; vllm: a saved checkpoint through the harness's "
                                "vLLM backend, run in the vLLM environment (`moekit vllm-env`)"),
    model_args: str = typer.Option(None, "--model-args", help="vllm backend: vllm arguments as JSON or key=value,... "
                                   "(tensor_parallel_size, gpu_memory_utilization, max_model_len; on a CPU-only "
                                   "machine gpu_memory_utilization defaults to 0.15: the share of RAM vLLM reserves)"),
    vllm_python: Path = typer.Option(None, "--vllm-python", envvar="MOEKIT_VLLM_PYTHON",
                                     help="python of the vLLM environment (default: the one `moekit vllm-env` made)"),
    costs: bool = typer.Option(False, "--costs", help="also measure parameters, bytes, peak forward memory, prefill/decode speed"),
    baseline: str = typer.Option(None, "--baseline", help="original model: its costs are measured in the same run (ratios)"),
    ppl_data: str = typer.Option(None, "--ppl-data", help="also perplexity on this text (e.g. ../shared/data/dev/c4_valid_dev.jsonl); "
                                 "with --backend vllm computed in this process one decoder layer at a time"),
    ppl_tokens: int = option(EvalStep, "ppl_tokens", "--ppl-tokens", help="perplexity over the first N tokens"),
    ppl_window: int = option(EvalStep, "ppl_window", "--ppl-window", help="perplexity window length"),
    field: str = FIELD, dtype: str = DTYPE, device: str = DEVICE, trust_remote_code: bool = TRUST,
    device_map: str = DEVICE_MAP, max_memory: str = MAX_MEMORY, offload_folder: Path = OFFLOAD,
):
    """Score MODEL with lm-evaluation-harness's own tasks; write a JSON result and a Markdown table."""
    from moekit.errors import MoekitError
    from moekit.eval.harness import check_tasks, markdown_table, write_result

    files = _data_files(data_file)
    task_list = check_tasks(tasks, data_dir, files)  # bad names and missing files fail before any loading
    out = Path(out) if out else Path(f"eval_{Path(model).name or 'model'}.json")
    if out.is_dir():
        raise MoekitError(f"--out '{out}' is a directory: give a file name such as {out / 'result.json'}")
    for existing in (out, out.with_suffix(".md")):  # the JSON result and the Markdown table beside it
        if existing.exists() and not overwrite:
            raise MoekitError(f"'{existing}' exists: pass --overwrite to replace it, or choose another --out")
    if backend not in ("hf", "vllm"):
        raise MoekitError(f"unknown backend '{backend}': use hf (in process) or vllm (saved checkpoints, GPU)")
    if backend == "vllm":
        from moekit.eval.harness import evaluate_checkpoint

        import torch

        from moekit.checkpoint.load import resolve
        from moekit.cli.common import engine_args

        if costs:
            raise MoekitError("--costs needs the model in process: use --backend hf for it")
        margs = engine_args(model_args)
        if not torch.cuda.is_available():
            margs.setdefault("gpu_memory_utilization", 0.15)
        path = resolve(model)
        if isinstance(path, str) or not Path(path).is_dir():
            raise MoekitError(f"--backend vllm evaluates a saved checkpoint directory; '{model}' is not one")
        result = evaluate_checkpoint(str(path), task_list, data_dir, limit, batch_size, num_fewshot=num_fewshot,
                                     data_files=files, dtype="float32" if dtype == "auto" and not torch.cuda.is_available()
                                     else dtype, trust_remote_code=trust_remote_code, model_args=margs,
                                     vllm_python=vllm_python)
        if ppl_data:  # in this process, one decoder layer at a time: the model is served by vLLM, not loaded here
            from moekit.cli.common import tokenizer_of
            from moekit.eval.perplexity import perplexity_sequential, windows

            toks = windows(tokenizer_of(str(path), trust_remote_code), ppl_data, max_tokens=ppl_tokens,
                           window=ppl_window, field=field)
            result["perplexity"] = {"value": perplexity_sequential(path, toks, batch_size=batch_size, device=device,
                                                                   dtype=None if dtype == "auto" else dtype),
                                    "data": ppl_data, "tokens": int(toks.numel()), "window": ppl_window,
                                    "mode": "sequential"}
    else:
        from moekit.eval.harness import evaluate

        m, tok = load(model, dtype, device, trust_remote_code, device_map, max_memory, offload_folder)
        result = evaluate(m, tok, task_list, data_dir, limit, batch_size, num_fewshot, data_files=files,
                          model_name=model)
        if ppl_data:
            from moekit.eval.perplexity import perplexity, windows

            toks = windows(tok, ppl_data, max_tokens=ppl_tokens, window=ppl_window, field=field)
            result["perplexity"] = {"value": perplexity(m, toks), "data": ppl_data, "tokens": int(toks.numel()),
                                    "window": ppl_window}
        if costs or baseline:
            from moekit.eval.costs import compare_costs

            models, cks, names = [m], [_checkpoint_of(model)], [model]
            if baseline:
                b, _ = load(baseline, dtype, device, trust_remote_code, device_map, max_memory, offload_folder)
                models, cks, names = [b, m], [_checkpoint_of(baseline), cks[0]], [baseline, model]
            c = compare_costs(models, cks, names=names)
            c["model_index"] = len(models) - 1  # the evaluated model; with --baseline the ratios are to the baseline
            result["costs"] = c
    json_path, md_path = write_result(result, out)
    print(markdown_table([result]), end="")
    if result.get("costs"):
        from moekit.eval.costs import costs_table

        print(costs_table(result["costs"]), end="")
    if result.get("perplexity"):
        print(f"perplexity {result['perplexity']['value']:.3f} on {ppl_data}")
    print(f"wrote {json_path} and {md_path}")


@app.command()
def compare(results: list[Path] = typer.Argument(..., help="result JSON files written by `moekit eval --out`"),
            plot: Path = typer.Option(Path("compare.png"), "--plot", help="PNG of accuracy (and perplexity) vs parameters"),
            params: str = typer.Option("total", "--params", help="x axis: total or active parameters"),
            overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing --plot image")):
    """Side-by-side table of several results and a plot of accuracy against parameters."""
    from moekit.errors import MoekitError
    from moekit.eval.compare import compare_table, load_results
    from moekit.eval.compare import plot as draw

    if plot.exists() and not overwrite:
        raise MoekitError(f"'{plot}' exists: pass --overwrite to replace it, or choose another --plot")

    loaded = load_results(results)
    print(compare_table(loaded), end="")
    print(f"wrote {draw(loaded, plot, params=params)}")
