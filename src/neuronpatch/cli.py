"""The ``neuronpatch`` command line.

``neuronpatch run HEAD_DIR`` is the seed notebook as a command: baseline table,
one table per intervention, the regression summary with its interpretation,
per-input sensitivity, and ``summary.json`` plus five figures in ``--out``.
``neuronpatch rank HEAD_DIR`` ranks every unit of the head's layer by |slope|
(``rank.json`` and ``rank.png``).
Bad input ends the command with one line on stderr (``neuronpatch: error: ...``)
and exit status 2, never a traceback. Paths are checked before any work: an
``--out`` that is a file, an ``--inputs`` that is ``/dev/zero``, a config.json
nested 100,000 levels deep all fail in milliseconds, before torch is imported
(the bounds are in :mod:`neuronpatch.limits`).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from neuronpatch._io import check_output_directory
from neuronpatch.errors import InputError, NeuronpatchError

if TYPE_CHECKING:
    from neuronpatch.heads import Head
    from neuronpatch.rank import RankResult
    from neuronpatch.result import ExperimentResult

EXIT_USAGE = 2


def _f(x: float, width: int = 10, prec: int = 4) -> str:
    return f"{'nan':>{width}}" if math.isnan(x) else f"{x:>{width}.{prec}f}"


def _short(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def read_inputs(path: Path) -> list[str]:
    """One text per line; blank lines are skipped.

    The file is read lazily within :data:`neuronpatch.limits.INPUTS_FILE_BYTES`
    and :data:`~neuronpatch.limits.INPUTS_FILE_LINES`; ``/dev/zero``, FIFOs and
    directories are refused before they are opened.

    Raises:
        InputError: the file is missing, not a regular file, over a limit,
            not UTF-8 text, or holds no text.
    """
    from neuronpatch.limits import read_lines_bounded

    lines = read_lines_bounded(path, what="inputs file", error=InputError)
    texts = [line.strip() for line in lines if line.strip()]
    if not texts:
        raise InputError(f"{path}: inputs file has no text (expected one input per line)")
    return texts


def _check_head_config(head_dir: Path) -> None:
    """Read the head's config.json within bounds before anything heavy is imported.

    A config.json that is a directory, a symlink loop, ``/dev/zero`` or nested
    100,000 levels deep is one line here, whatever the loader does with it.
    """
    from neuronpatch.errors import HeadConfigError
    from neuronpatch.limits import load_json_bounded

    cfg = head_dir / "config.json"
    if head_dir.is_dir() and os.path.lexists(cfg):
        load_json_bounded(cfg, what="head config", error=HeadConfigError)


@contextmanager
def _quiet_missing_glyphs() -> Iterator[None]:
    """Silence matplotlib's "Glyph ... missing from font(s)" for CJK or emoji inputs.

    The figures still render (a box for each missing glyph); eight warnings on
    the terminal tell the user nothing they can act on.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Glyph \d+ .*missing from font", category=UserWarning)
        yield


def format_report(res: ExperimentResult) -> str:
    """The printed report of a run (tables as the seed notebook prints them)."""
    out: list[str] = []
    w = 48
    out.append(f"Head      {res.head_path}  ({res.head_type})")
    out.append(f"Unit      {res.unit_hook}[{res.target_neuron}]  of {res.model_name}")
    out.append(f"Reads     {res.feature_hook}  at token_pos={res.token_pos}; "
               f"patching position={res.patch_position}; engine route: {res.method}")
    out.append("")
    out.append(f"Baseline ({len(res.inputs)} inputs)")
    out.append(f"  {'#':>2}  {'input':<{w}} {'tokens':>6} {'activation':>10} {'prediction':>10}")
    for i, r in enumerate(res.per_input):
        out.append(f"  {i:>2}  {_short(r.text, w):<{w}} {r.n_tokens:>6} "
                   f"{_f(r.clean_activation)} {_f(r.clean_prediction)}")
    b = res.baseline
    out.append(f"  activation mean {res.clean_activation.mean():.4f} sd {res.clean_activation.std():.4f}"
               f" · prediction mean {res.clean_prediction.mean():.4f} "
               f"sd {res.clean_prediction.std():.4f}")
    corr = (f"Pearson r {b.pearson_r:.4f} (p={b.pearson_p:.3g}), Spearman ρ {b.spearman_rho:.4f}"
            if b.reason is None else f"correlation undefined: {b.reason}")
    out.append(f"  {corr}")
    dact, dpred = res.activation_change, res.prediction_change
    for j, iv in enumerate(res.interventions):
        out.append("")
        out.append(f"Experiment {iv.label}")
        out.append(f"  {'#':>2}  {'input':<{w}} {'patched act':>11} {'Δ act':>10} {'Δ pred':>10}")
        for i, text in enumerate(res.inputs):
            out.append(f"  {i:>2}  {_short(text, w):<{w}} {_f(res.patched_activation[i, j], 11)} "
                       f"{_f(dact[i, j])} {_f(dpred[i, j])}")
        out.append(f"  average Δ act {dact[:, j].mean():.4f} · average Δ pred {dpred[:, j].mean():.4f}")
    from neuronpatch.plots import interval_text

    fit, ci, r2_ci = res.fit, res.slope_ci95, res.r_squared_ci95
    out.append("")
    out.append("Regression of Δ prediction on Δ activation (all inputs × interventions)")
    out.append(f"  slope      {fit.slope:.6f}  (stderr {fit.stderr:.3g}, p={fit.p_value:.3g}, "
               f"{interval_text(ci.lo, ci.hi, 4)})")
    out.append(f"  intercept  {fit.intercept:.6f}")
    out.append(f"  R²         {fit.r_squared:.6f}  ({interval_text(r2_ci.lo, r2_ci.hi, 4, what='R²')})")
    if not math.isnan(res.write_direction_cosine):
        out.append(f"  cosine(head weights, unit write direction) {res.write_direction_cosine:.4f}")
    for line in res.interpretation():
        out.append(f"  → {line}")
    out.append("")
    out.append("Per-input sensitivity (sorted by |slope|)")
    out.append(f"  {'input':<{w}} {'slope':>10} {'R²':>10} {'points':>6}")
    rows = sorted(res.per_input, key=lambda r: -abs(r.slope) if not math.isnan(r.slope) else 0.0)
    for r in rows:
        out.append(f"  {_short(r.text, w):<{w}} {_f(r.slope)} {_f(r.r2)} {r.fit.n:>6}")
    for note in res.notes:
        out.append(f"note: {note}")
    return "\n".join(out)


def _checked_inputs(args: argparse.Namespace) -> list[str] | None:
    """Check --out, --inputs/--text and the head's config; the texts (None: the defaults)."""
    check_output_directory(args.out, "--out")
    if args.inputs is not None and args.text:
        raise InputError("give --inputs FILE or --text, not both")
    _check_head_config(args.head_dir)
    return read_inputs(args.inputs) if args.inputs is not None else (args.text or None)


class _Tokenizing:
    """What the engine's ``encode`` reads of a model: its tokenizer and its context length."""

    def __init__(self, tokenizer: Any, n_ctx: int | None) -> None:
        self.tokenizer = tokenizer
        self.n_ctx = n_ctx


def _model_config(name: str) -> tuple[Path, Any] | None:
    """A model's directory and its transformers config, read without its weights.

    A model that cannot be found is one line here, as the loader would say it;
    a config that cannot be read is left to the loader (None).
    """
    from neuronpatch.models import resolve_model_path

    path = resolve_model_path(name)
    try:
        from transformers import AutoConfig

        return path, AutoConfig.from_pretrained(path)
    except Exception:  # the model load names what is wrong with it
        return None


def _config_int(config: Any, *keys: str) -> int | None:
    """The first positive integer among ``keys`` of a model config (its text config first)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key in keys:
        v = getattr(text, key, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def _precheck_run(head: Head, texts: list[str] | None, position: str | int | None,
                  checkpoint: str | None = None) -> None:
    """Refuse, before a model loads, what its config.json and tokenizer already rule out.

    A head whose ``target_layer`` or ``feature_layer`` the model does not have, a
    ``--position`` outside an input, an input longer than the context: the same
    one-line errors the engine raises after loading, from the model's config and
    tokenizer (about a second), not its weights. Anything this cannot decide is
    left to the engine, which checks it all again.
    """
    from neuronpatch.heads import check_layers

    cfg = head.config
    found = _model_config(checkpoint or cfg.base_model_name)
    if found is None:
        return
    path, config = found
    n_layers = _config_int(config, "num_hidden_layers")
    if n_layers is not None:
        check_layers(cfg, n_layers, head.config_path)
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path)
        from neuronpatch.engine import DEFAULT_INPUTS, encode
    except Exception:  # the model load names what is wrong with it
        return
    model = _Tokenizing(tokenizer, _config_int(config, "max_position_embeddings", "n_positions", "n_ctx",
                                               "seq_length"))
    try:
        encode(cast(Any, model), list(DEFAULT_INPUTS if texts is None else texts),
               prepend_bos=cfg.prepend_bos, token_pos=cfg.token_pos,
               position=cfg.token_pos if position is None else position)
    except NeuronpatchError:
        raise
    except Exception:  # the engine asks more of a model than this stand-in has: it checks itself
        return


def _cmd_run(args: argparse.Namespace) -> int:
    # Everything a user can get wrong is checked before torch is imported or a model loads.
    texts = _checked_inputs(args)
    position: str | int | None = None if args.position is None else args.position
    if position not in (None, "last", "all"):
        try:
            position = int(args.position)
        except ValueError:
            raise InputError(
                f"--position {args.position!r} is invalid; expected last, all or an integer"
            ) from None

    from neuronpatch.heads import load_head

    # ... and what the model's config.json and tokenizer can tell, before its weights load.
    head = load_head(args.head_dir, checkpoint=args.model)
    _precheck_run(head, texts, position, args.model)

    from neuronpatch.artifacts import write_artifacts
    from neuronpatch.engine import run_experiment

    res = run_experiment(
        head, texts, scale=args.scale, set=args.set, add=args.add, zero=args.zero,
        mean=args.mean, position=position,
        batch_size=args.batch_size, device=args.device, dtype=args.dtype, method=args.route,
        progress=True, model=args.model,
    )
    print(format_report(res))
    with _quiet_missing_glyphs():
        art = write_artifacts(res, args.out)
    print("")
    print(f"Wrote {art.summary} and {len(art.figures)} figures in {art.directory}")
    return 0


def _opt(x: float | None, width: int = 12, prec: int = 4) -> str:
    return f"{'—':>{width}}" if x is None else _f(x, width, prec)


def format_ranking(res: RankResult, head: str | None = None) -> str:
    """The printed table of ``neuronpatch rank``: the top units, the target, the screen's agreement."""
    out: list[str] = []
    out.append(f"Head      {head or res.head_path}")
    out.append(f"Layer     {res.unit_hook}: {res.width} units of {res.model_name}; the head reads "
               f"{res.feature_hook}")
    out.append(f"Method    {res.method} · {len(res.inputs)} inputs · patched with "
               f"{', '.join(res.interventions)}")
    out.append("")
    out.append(f"  {'rank':>5}  {'unit':>6}  {'screen slope':>12}  {'exact slope':>12}  {'exact R²':>9}")
    rows = res.head_rows()
    shown = {r.unit for r in rows}
    if res.target is not None and res.target not in shown:
        rows = [*rows, res.unit(res.target)]
    for k, r in enumerate(rows):
        if k == res.top and k < len(rows):
            out.append(f"  {'…':>5}")
        mark = "  ◀ target" if r.unit == res.target else ""
        out.append(f"  {r.rank:>5}  {r.unit:>6}  {_opt(r.screen_slope)}  {_opt(r.exact_slope)}  "
                   f"{_opt(r.exact_r_squared, 9)}{mark}")
    out.append("")
    out.append("rank: units whose |slope| is at least this one's; the slope is exact where the unit "
               "was patched (or computed exactly), else the screen's first-order estimate")
    if res.target is not None:
        out.append(f"Target    unit {res.target}: rank {res.target_rank} of {res.width}")
    else:
        out.append("Target    the head's target unit is not in this layer")
    if res.screen_slope is not None:
        rho = res.rank_correlation
        rho_text = "undefined (fewer than 3 units or a constant slope)" if math.isnan(rho) else f"{rho:.3f}"
        agree = round(res.sign_agreement * len(res.confirmed))
        out.append(f"Screen    Spearman ρ of |screen| and |exact| slope over the top {len(res.confirmed)}: "
                   f"{rho_text}; signs agree on {agree} of {len(res.confirmed)}")
    for note in res.notes:
        out.append(f"note: {note}")
    return "\n".join(out)


def _cmd_rank(args: argparse.Namespace) -> int:
    texts = _checked_inputs(args)

    from neuronpatch._io import ensure_directory
    from neuronpatch.artifacts import write_json
    from neuronpatch.plots import write_rank_figure
    from neuronpatch.rank import rank_units

    res = rank_units(
        args.head_dir, texts, layer=args.layer, layer_type=args.layer_type, top=args.top,
        scale=args.scale, set=args.set, add=args.add, zero=args.zero, mean=args.mean,
        device=args.device, dtype=args.dtype, batch_size=args.batch_size, screen=args.screen,
        model=args.model,
    )
    print(format_ranking(res, str(args.head_dir)))
    ensure_directory(args.out, "--out")
    write_json(args.out / "rank.json", res.to_dict())
    with _quiet_missing_glyphs():
        figure = write_rank_figure(res, args.out / "rank.png")
    print("")
    print(f"Wrote {args.out / 'rank.json'} and {figure}")
    return 0


def _cmd_conformance(args: argparse.Namespace) -> int:
    from neuronpatch.conformance import TOLERANCE, run

    cells = run(args.out, args.arch)
    off = [c for c in cells if c.error is not None and c.error > TOLERANCE]
    print(f"Wrote {args.out}: {len(cells)} cells, {len(off)} off")
    return 1 if off else 0


def _cmd_train_head(args: argparse.Namespace) -> int:
    check_output_directory(args.out, "--out")
    if args.corpus is not None:
        from neuronpatch.limits import CORPUS_FILE_BYTES, check_regular_file

        check_regular_file(args.corpus, max_bytes=CORPUS_FILE_BYTES, what="corpus", error=InputError)

    from neuronpatch.training import check_arguments, dictionary_layer, log, train_head

    if args.sae is not None:
        if args.latent is None or args.neuron is not None or args.layer_type != "post":
            raise InputError("--sae PATH needs --latent I (and no --neuron or --layer-type)")
        args.layer, args.neuron, args.layer_type = dictionary_layer(args.sae, args.layer), args.latent, "sae"
    elif args.latent is not None:
        raise InputError("--latent needs --sae PATH (a neuron is --neuron)")
    elif args.layer is None or args.neuron is None:
        raise InputError("train-head needs --layer L and --neuron N (or --sae PATH --latent I)")

    # A bad flag is refused from the arguments and the model's config.json, before it loads.
    def check(n_layers: int | None) -> None:
        check_arguments(layer=args.layer, feature_layer=args.feature_layer, layer_type=args.layer_type,
                        head_type=args.type, bins=args.bins, windows=args.windows,
                        coordinates=args.coordinates, n_layers=n_layers)

    check(None)
    found = _model_config(args.model)
    if found is not None:
        check(_config_int(found[1], "num_hidden_layers"))

    rep = train_head(
        model=args.model, layer=args.layer, neuron=args.neuron, layer_type=args.layer_type,
        feature_layer=args.feature_layer, head_type=args.type, hidden_dim=args.hidden_dim,
        bins=args.bins, intervene=args.intervene, corpus=args.corpus, windows=args.windows,
        seed=args.seed, out=args.out, coordinates=args.coordinates, progress=True, sae=args.sae,
    )
    data = "interventional" if args.intervene else "natural"
    unit = (f"latent {args.latent} of {args.sae}" if args.sae
            else f"{args.layer_type} L{args.layer} N{args.neuron}")
    log(f"Trained a {args.type} head on {rep.n_train} {data} windows "
        f"({rep.n_held_out} held out) for {unit} "
        f"of {args.model}, reading feature_layer {args.feature_layer} ({args.coordinates} coordinates)")
    log(f"  unit activation: mean {rep.activation_mean:.4f}, sd {rep.activation_std:.4f}")
    log(f"  R²        train {rep.train_r2:.4f}   held-out {rep.held_out_r2:.4f}")
    if rep.train_accuracy is not None and rep.held_out_accuracy is not None:
        log(f"  accuracy  train {rep.train_accuracy:.4f}   held-out {rep.held_out_accuracy:.4f}")
    log(f"Wrote {args.out / 'config.json'} and {args.out / 'head.pt'}")
    for warning in rep.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if args.min_r2 is not None and not rep.held_out_r2 >= args.min_r2:
        print(f"error: held-out R² {rep.held_out_r2:.4f} is below --min-r2 {args.min_r2:g}",
              file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (public so docs and tests can introspect it)."""
    parser = argparse.ArgumentParser(
        prog="neuronpatch", description="Causal tests for neuron-prediction heads.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="patch a head's unit and report how its prediction moves")
    run.add_argument("head_dir", type=Path, help="head directory (config.json + head.pt)")
    src = run.add_mutually_exclusive_group()
    src.add_argument("--inputs", type=Path, help="text file, one input per line")
    src.add_argument("--text", action="extend", nargs="+", metavar="T",
                     help="input texts (several after one --text, or --text repeated)")
    run.add_argument("--scale", type=float, nargs="+", metavar="F", help="scale factors")
    run.add_argument("--set", type=float, nargs="+", metavar="V", help="values to set")
    run.add_argument("--add", type=float, nargs="+", metavar="D", help="values to add")
    run.add_argument("--zero", action="store_true", help="also zero-ablate")
    run.add_argument("--mean", action="store_true", help="also mean-ablate (mean over inputs)")
    run.add_argument("--position", default=None,
                     help="where to patch: last, all or an index (default: the head's token_pos)")
    run.add_argument("--out", type=Path, default=Path("neuronpatch-out"),
                     help="directory for summary.json and figures (default: ./neuronpatch-out)")
    run.add_argument("--batch-size", type=int, default=128, help="rows per forward pass")
    run.add_argument("--device", default="auto", help="auto (CUDA when available, default), cpu, cuda:N")
    run.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                     help="model dtype (default float32)")
    run.add_argument("--route", default="auto", choices=("auto", "upstream", "linear", "kv", "full"),
                     help="force an engine route (default: the cheapest exact one)")
    run.add_argument("--model", default=None, metavar="CHECKPOINT",
                     help="run against this checkpoint (directory or model name) instead of the head's "
                          "base_model_name; its shapes must fit the head")
    run.set_defaults(func=_cmd_run, subparser=run)

    rk = sub.add_parser("rank", help="rank every unit of a layer by how strongly the head reads it")
    rk.add_argument("head_dir", type=Path, help="head directory (config.json + head.pt)")
    rk.add_argument("--layer", type=int, default=None, help="the layer to rank (default: the head's)")
    rk.add_argument("--layer-type", default=None,
                    help="post, mlp_out, attn_out, resid_pre, resid_post, ... (default: the head's)")
    rk.add_argument("--top", type=int, default=20, help="units confirmed by real patching and shown")
    rk_src = rk.add_mutually_exclusive_group()
    rk_src.add_argument("--inputs", type=Path, help="text file, one input per line")
    rk_src.add_argument("--text", action="extend", nargs="+", metavar="T",
                     help="input texts (several after one --text, or --text repeated)")
    rk.add_argument("--scale", type=float, nargs="+", metavar="F",
                    help="how confirmed units are patched (default: --scale 0 2)")
    rk.add_argument("--set", type=float, nargs="+", metavar="V", help="values to set")
    rk.add_argument("--add", type=float, nargs="+", metavar="D", help="values to add")
    rk.add_argument("--zero", action="store_true", help="also zero-ablate")
    rk.add_argument("--mean", action="store_true", help="also mean-ablate (each unit to its own mean)")
    rk.add_argument("--screen", default="auto", choices=("auto", "always", "never"),
                    help="auto: exact where the head reads right after the layer, else a gradient screen "
                         "confirmed by patching; always; never: patch every unit (default auto)")
    rk.add_argument("--out", type=Path, default=Path("neuronpatch-rank"),
                    help="directory for rank.json and rank.png (default: ./neuronpatch-rank)")
    rk.add_argument("--batch-size", type=int, default=128, help="rows per forward pass")
    rk.add_argument("--device", default="auto", help="auto (CUDA when available, default), cpu, cuda:N")
    rk.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                    help="model dtype (default float32)")
    rk.add_argument("--model", default=None, metavar="CHECKPOINT",
                    help="run against this checkpoint (directory or model name) instead of the head's "
                          "base_model_name; its shapes must fit the head")
    rk.set_defaults(func=_cmd_rank, subparser=rk)

    th = sub.add_parser("train-head", help="train a prediction head (seed artifact format)")
    th.add_argument("--model", default="neuronpatch-demo",
                    help="model directory, cached HF id or neuronpatch-demo (default)")
    th.add_argument("--layer", type=int, default=None, help="the unit's layer (with --sae: the dictionary's)")
    th.add_argument("--neuron", type=int, default=None, help="the unit's index")
    th.add_argument("--sae", type=Path, default=None, metavar="PATH",
                    help="a dictionary directory (SAELens' layout: cfg.json + sae_weights.safetensors): "
                         "the head predicts one of its latents (--latent)")
    th.add_argument("--latent", type=int, default=None, metavar="I", help="the latent's index (with --sae)")
    th.add_argument("--layer-type", default="post", help="post (MLP neuron, default), mlp_out, ...")
    th.add_argument("--feature-layer", type=int, required=True,
                    help="where the head reads: in transformer_lens coordinates (the default) the block "
                         "whose output it reads (-1: the last block, before the final norm); in hf "
                         "coordinates an index into hidden_states")
    th.add_argument("--type", choices=("regression", "classification"), default="regression")
    th.add_argument("--hidden-dim", type=int, default=None, help="hidden layer width (default: linear)")
    th.add_argument("--bins", type=int, default=8, help="classes of a classification head")
    th.add_argument("--intervene", action="store_true",
                    help="train on interventional data: the unit set to random values")
    th.add_argument("--corpus", type=Path, default=None,
                    help="text file (documents split by blank lines); default: the demo corpus")
    th.add_argument("--windows", type=int, default=3000, help="text windows to collect")
    th.add_argument("--seed", type=int, default=0)
    th.add_argument("--coordinates", default="transformer_lens", choices=("transformer_lens", "hf"),
                    help="coordinates of --feature-layer and the written head (default transformer_lens)")
    th.add_argument("--out", type=Path, required=True, help="head directory to write")
    th.add_argument("--min-r2", type=float, default=None, metavar="R2",
                    help="exit with status 1 when the held-out R² is below this")
    th.set_defaults(func=_cmd_train_head, subparser=th)
    cf = sub.add_parser("conformance", help="check the engine on a tiny random model of every architecture")
    cf.add_argument("--out", type=Path, default=Path("docs/conformance.md"), help="table to write")
    cf.add_argument("--arch", action="append", metavar="TYPE",
                    help="an HF model_type to check (repeatable; default: every candidate)")
    cf.set_defaults(func=_cmd_conformance, subparser=cf)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``neuronpatch`` command."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # said by the subcommand, with its usage, not by the top-level parser
        args.subparser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return int(args.func(args))
    except NeuronpatchError as e:
        print(f"neuronpatch: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:  # a path the user gave cannot be read or written (permissions, disk full)
        where = f"{e.filename}: " if e.filename else ""
        print(f"neuronpatch: error: {where}{e.strerror or e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("neuronpatch: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
