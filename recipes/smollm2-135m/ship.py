#!/usr/bin/env python
"""Copy a finished SmolLM2-135M run into the package as the embedded default model.

Only what hypervocab adds is shipped: the config, the hyper-encoders and the LoRA adapter, stored in
float16 (half the bytes; they load into a float32 model unchanged in range).  The base model is named by
its ordinary hub id so that a user with a hub gets it the usual way; ``hypervocab demo`` passes the
registry-converted folder instead.  The model card's training facts come from the run's files.

    python recipes/smollm2-135m/ship.py --run .cache/runs/smollm2-135m
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def _half(src: Path, dst: Path) -> int:
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    tensors = {k: v.to(torch.float16) if v.is_floating_point() else v for k, v in tensors.items()}
    save_file(tensors, str(dst), metadata=meta)
    return sum(v.numel() for v in tensors.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=ROOT / ".cache" / "runs" / "smollm2-135m", help="the run folder")
    parser.add_argument("--out", type=Path, default=ROOT / "src" / "hypervocab" / "shipped" / "smollm2-135m-instruct")
    parser.add_argument("--device", default="CPU", help="what the run trained on, for the model card (default CPU)")
    args = parser.parse_args()

    run = args.run
    if not (run / "hypervocab_config.json").is_file():
        raise SystemExit(f"{run} holds no finished model (no hypervocab_config.json): let the run finish first")
    tmp = args.out.with_name(args.out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in ("hypervocab_config.json", "adapter_config.json"):
        cfg = json.loads((run / name).read_text())
        cfg["base_model_name_or_path"] = HUB_ID
        (tmp / name).write_text(json.dumps(cfg, indent=2) + "\n")
    params = sum(_half(run / name, tmp / name) for name in ("hypervocab_encoders.safetensors",
                                                             "adapter_model.safetensors"))
    # training facts for the model card
    train = json.loads((run / "train_config.json").read_text())
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in rows if "lm_loss" in r]
    evals = [r for r in rows if "eval_loss" in r]
    codes_per_step = train["batch_size"] * train["grad_accum"] * train["window"]
    cpt = sum(r["codes_per_token"] for r in steps) / len(steps)
    # compute time: each logged step's seconds (its base tokens over its rate), times the steps it stands for
    step_s = [codes_per_step / r["codes_per_token"] / r["base_tokens_per_s"] for r in steps]
    hours = sum(step_s) / len(step_s) * steps[-1]["step"] / 3600
    facts = {"steps": steps[-1]["step"], "device": args.device, "codes_per_step": codes_per_step,
             "mean_codes_per_token": cpt,
             # counted along the data by the trainer; older runs logged no count: estimated from full windows
             "base_tokens_seen": steps[-1].get("base_tokens_seen", int(steps[-1]["step"] * codes_per_step / cpt)),
             "base_tokens_counted": "base_tokens_seen" in steps[-1],
             "estimated_training_hours": round(hours, 2),
             "first_lm_loss": steps[0]["lm_loss"], "last_lm_loss": steps[-1]["lm_loss"],
             "eval_loss": [(r["step"], r["eval_loss"]) for r in evals], "trainable_parameters": params,
             "train_config": train}
    (tmp / "training_facts.json").write_text(json.dumps(facts, indent=2) + "\n")
    card = ROOT / "recipes" / "smollm2-135m" / "MODEL_CARD.md"
    if card.is_file():
        shutil.copyfile(card, tmp / "README.md")
    shutil.rmtree(args.out, ignore_errors=True)
    tmp.rename(args.out)
    size = sum(p.stat().st_size for p in args.out.iterdir())
    print(f"shipped {params:,} parameters ({size / 1e6:.1f} MB) to {args.out}")
    print(json.dumps({k: v for k, v in facts.items() if k != "train_config"}, indent=1))


if __name__ == "__main__":
    main()
