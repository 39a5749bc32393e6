#!/usr/bin/env python
"""Generation speed of one public zip2zip checkpoint in both runtimes: the public ``zip2zip`` and hypervocab.

A checkpoint of the public format is built with the public package itself (``Zip2ZipModel(...)
.save_pretrained``) around a base model: by default the real SmolLM2-135M-Instruct (converted once
into ``.cache/`` by ``scripts/assets.py``), or ``--model tiny`` (a tiny random Llama over the same
tokenizer), or any folder given with ``--model``.  Its encoders get random weights, the output
side enlarged so that hypertokens are chosen (speed does not depend on training, but the work per
step does depend on how many entries a step installs).  ``--checkpoint DIR`` times an existing
checkpoint instead.

Both runtimes then read the same compressed prompt (hypervocab's tokenizer: the public one pads
batches wrongly) and generate ``--new-tokens`` codes greedily, one timed run each
(``time.perf_counter``, after one warm-up generation of 2 codes each, so that one-time set-up
is not counted).  The outputs must be identical; the table gives the time, codes per second,
and the ratio (public time / hypervocab time: above 1 means hypervocab is faster).

    python benchmarks/interop_speed.py                      # SmolLM2-135M, batch 1, 64 codes
    python benchmarks/interop_speed.py --model tiny --batch 4 --encoder transformer
    python benchmarks/interop_speed.py --checkpoint path/to/zip2zip-checkpoint

Needs ``zip2zip==0.2.0`` (``pip install --no-deps zip2zip==0.2.0 omegaconf``).  Results are printed
and written to ``benchmarks/results/interop_speed.md`` / ``.json`` (``--no-save`` to skip).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from hypervocab.loading import load

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
RESULTS = ROOT / "benchmarks" / "results"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, help="an existing checkpoint of the public format to time")
    parser.add_argument("--model", default="smollm2",
                        help="base model of the checkpoint to build: 'smollm2' (default), 'tiny', or a folder "
                             "holding a causal LM and its tokenizer")
    parser.add_argument("--encoder", choices=("res_latent_attn", "transformer"), default="res_latent_attn",
                        help="encoder type of the checkpoint to build (default: res_latent_attn)")
    parser.add_argument("--max-codebook-size", type=int, default=1024, help="C of the checkpoint to build")
    parser.add_argument("--max-subtokens", type=int, default=4, help="M of the checkpoint to build")
    parser.add_argument("--prompt-tokens", type=int, default=256, help="base tokens of each prompt (default 256)")
    parser.add_argument("--new-tokens", type=int, default=64, help="codes to generate (default 64)")
    parser.add_argument("--batch", type=int, default=1, help="prompts generated together (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random encoder weights")
    parser.add_argument("--output-scale", type=float, default=3.0,
                        help="factor on the output encoder's last weights: larger, more hypertokens win (default 3)")
    parser.add_argument("--no-save", action="store_true", help="print only, write nothing under benchmarks/results")
    return parser.parse_args(argv)


def base_folder(model: str, work: Path) -> Path:
    """The base model's folder (with its tokenizer: the public runtime loads both from it)."""
    if model == "smollm2":
        from assets import smollm2_model_dir

        return Path(smollm2_model_dir())
    if model == "tiny":
        import transformers
        from assets import smollm2_tokenizer_dir

        tok = transformers.AutoTokenizer.from_pretrained(smollm2_tokenizer_dir())
        torch.manual_seed(0)
        config = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                          max_position_embeddings=4096, tie_word_embeddings=True,
                                          initializer_range=0.3, eos_token_id=tok.eos_token_id,
                                          bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id)
        folder = work / "tiny-base"
        transformers.LlamaForCausalLM(config).save_pretrained(folder)
        tok.save_pretrained(folder)
        return folder
    return Path(model)


def build_checkpoint(base: Path, directory: Path, *, encoder: str, C: int, M: int, seed: int,
                     output_scale: float) -> None:
    """A checkpoint of the public format, written by the public package, with random encoder weights."""
    import transformers
    from zip2zip import CompressionConfig, Zip2ZipConfig, Zip2ZipModel
    from zip2zip.nn.encoders.config import ResLatentAttnConfig, TransformerEncoderConfig

    tok = transformers.AutoTokenizer.from_pretrained(base)
    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    width = model.get_input_embeddings().weight.shape[1]
    compression = CompressionConfig.from_tokenizer(tok, max_codebook_size=C, max_subtokens=M)
    if encoder == "transformer":  # works at the model width
        enc = TransformerEncoderConfig(hidden_size=width, num_hidden_layers=2, num_heads=4,
                                       intermediate_size=2 * width, position_encoding="learnable")
    else:  # a latent a quarter of the model width, as the public models use
        enc = ResLatentAttnConfig(hidden_size=max(16, width // 4), model_hidden_size=width, num_hidden_layers=2,
                                  num_heads=4)
    public = Zip2ZipModel(Zip2ZipConfig(base_model_name_or_path=str(base), encoder_type=encoder, encoder=enc,
                                        compression=compression), base_model=model)
    torch.manual_seed(seed)
    with torch.no_grad():
        out_enc = public.output_encoder
        for p in list(public.input_encoder.parameters()) + list(out_enc.parameters()):
            p.normal_(0, 0.3 / max(1, p.shape[-1] ** 0.5) if p.dim() > 1 else 0.3)
        # larger output vectors make hypertokens win some greedy steps
        target = out_enc.layers[-1].post_mlp_layernorm.weight if encoder == "transformer" else out_enc.proj_out.weight
        target.mul_(output_scale)
    public.save_pretrained(str(directory))


def prompts(tok: Any, n: int, tokens: int) -> list[str]:
    """The first ``tokens`` base tokens (as text) of the ``n`` largest stdlib modules."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for f in sorted(lib.glob("*.py"), key=lambda p: -p.stat().st_size)[:n]:
        ids = tok(f.read_text(encoding="utf-8"))["input_ids"][:tokens]
        out.append(tok.decode(ids))
    return out


def timed(fn: Any) -> tuple[float, Any]:
    start = time.perf_counter()
    with torch.no_grad():
        result = fn()
    return time.perf_counter() - start, result


def run(args: argparse.Namespace) -> dict[str, Any]:
    from zip2zip import Zip2ZipModel

    work = Path(tempfile.mkdtemp(prefix="interop-speed-"))
    try:
        if args.checkpoint is not None:
            directory = args.checkpoint
        else:
            base = base_folder(args.model, work)
            directory = work / "checkpoint"
            build_checkpoint(base, directory, encoder=args.encoder, C=args.max_codebook_size, M=args.max_subtokens,
                             seed=args.seed, output_scale=args.output_scale)
        theirs = Zip2ZipModel.from_pretrained(str(directory)).eval()
        # on the CPU in the public model's dtype, LoRA kept apart as the public runtime keeps it: the same rounding
        ours, tok = load(directory, device="cpu", dtype=next(theirs.parameters()).dtype, merged=False)
        batch = tok(prompts(tok.tokenizer, args.batch, args.prompt_tokens), return_tensors="pt", padding=True)
        ids, mask = batch["input_ids"], batch["attention_mask"]

        def public(n: int) -> torch.Tensor:
            return theirs.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False)

        def hypervocab(n: int) -> Any:
            return ours.generate(ids, mask, max_new_tokens=n, return_dict_in_generate=True)

        for fn in (public, hypervocab):  # warm-up: first-call set-up is not what is measured
            timed(lambda fn=fn: fn(2))
        t_public, out_public = timed(lambda: public(args.new_tokens))
        t_ours, out_ours = timed(lambda: hypervocab(args.new_tokens))
        T = ids.shape[1]
        eos = getattr(theirs.base_model.generation_config, "eos_token_id", None)
        eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        same, codes_public = True, 0
        for b, mine in enumerate(out_ours.new_codes):
            row = out_public[b, T:].tolist()
            stop = next((i + 1 for i, c in enumerate(row) if c in eos), len(row))
            codes_public += stop
            same = same and row[:stop] == mine
        codes_ours = sum(len(c) for c in out_ours.new_codes)
        V = ours.config.base_vocab_size
        return {
            "checkpoint": str(args.checkpoint) if args.checkpoint else (
                f"built: {args.model}, {args.encoder}, C={args.max_codebook_size}, M={args.max_subtokens}"),
            "batch": args.batch, "prompt_codes": int(mask.sum()), "prompt_base_tokens": args.prompt_tokens * args.batch,
            "new_codes": {"public": codes_public, "hypervocab": codes_ours},
            "new_hypertokens": sum(c >= V for codes in out_ours.new_codes for c in codes),
            "seconds": {"public": t_public, "hypervocab": t_ours},
            "codes_per_second": {"public": codes_public / t_public, "hypervocab": codes_ours / t_ours},
            "ratio": t_public / t_ours, "identical_outputs": same,
            "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.platform(),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


def table(r: dict[str, Any]) -> str:
    rows = [f"Checkpoint: {r['checkpoint']}; batch {r['batch']}, prompt {r['prompt_codes']} codes "
            f"({r['prompt_base_tokens']} base tokens); torch {r['torch']}, {r['threads']} threads; one run each.",
            "",
            "| runtime | new codes | seconds | codes/s |",
            "| --- | ---: | ---: | ---: |"]
    for name in ("public", "hypervocab"):
        rows.append(f"| {'zip2zip 0.2.0' if name == 'public' else 'hypervocab'} | {r['new_codes'][name]} | "
                    f"{r['seconds'][name]:.3f} | {r['codes_per_second'][name]:.1f} |")
    rows += ["", f"**Ratio (public time / hypervocab time): {r['ratio']:.2f}x**; identical outputs: "
                 f"{'yes' if r['identical_outputs'] else 'NO'}; hypertokens among the new codes: "
                 f"{r['new_hypertokens']}."]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    result = run(args)
    text = table(result)
    print(text)
    if not args.no_save:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "interop_speed.md").write_text("# Generation speed: public zip2zip runtime vs hypervocab\n\n"
                                                  + text + "\n", encoding="utf-8")
        (RESULTS / "interop_speed.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    if not result["identical_outputs"]:
        sys.exit("the two runtimes wrote different codes")


if __name__ == "__main__":
    main()
