"""`qsae steer`: steer a latent (or the built-in code/comment CAA vector) at given precisions,
print the generations with and without steering and the effect / KL at each precision."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_steer_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``qsae steer``."""
    parser.add_argument("--model", default=None, help="model path or hub id (default: the embedded SmolLM2-135M)")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "nf4"], help="first is the baseline")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--latent", type=int, help="steer this latent of --sae")
    what.add_argument("--caa", choices=["code-comment"], help="steer with a built-in CAA pair set's vector")
    parser.add_argument("--sae", default=None, help="SAE checkpoint folder (with --latent)")
    parser.add_argument("--mode", choices=["add", "clamp"], default="add")
    parser.add_argument("--hook", default="blocks.15.hook_resid_post", help="hook for --caa (default blocks.15.hook_resid_post)")
    parser.add_argument("--strength", type=float, default=None,
                        help="latent: multiple of its typical max activation (default 4); "
                             "caa: multiple of the CAA vector (default 1)")
    parser.add_argument("--prompt", action="append", default=None, help="prompt(s) (default: built-in code prompts)")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--device", default="cpu")


def run_steer_command(args: argparse.Namespace) -> int:
    """Load the precisions, build the intervention, print generations and measures."""
    from qsae_lens.assets import default_model_path
    from qsae_lens.interventions.caa import (
        CODE_COMMENT_PAIRS,
        CODE_COMMENT_TARGET,
        CODE_COMMENT_TEST_PROMPTS,
        caa_vector,
        logprob_diff_measure,
    )
    from qsae_lens.interventions.steering import steer, steer_feature, typical_max_activation
    from qsae_lens.interventions.transfer import intervention_transfer
    from qsae_lens.models import load_model

    if args.latent is not None and not args.sae:
        raise ValueError("--latent needs --sae FOLDER (an SAE checkpoint folder).")
    if args.sae and not (Path(args.sae) / "cfg.json").is_file():
        raise FileNotFoundError(f"--sae {args.sae}: no cfg.json there; pass an SAE checkpoint folder.")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1; got {args.max_new_tokens}.")
    if args.strength is None:
        args.strength = 4.0 if args.latent is not None else 1.0
    prompts = args.prompt or list(CODE_COMMENT_TEST_PROMPTS)
    path = args.model or default_model_path()
    models = {p: load_model(path, p, args.device) for p in args.precisions}
    base = models[args.precisions[0]]
    if args.latent is not None:
        from sae_lens import SAE

        sae = SAE.load_from_disk(args.sae, device=args.device).eval()
        scale = float(typical_max_activation(base, sae, base.to_tokens(prompts), [args.latent])[0])
        label = f"latent {args.latent} ({args.mode}, {args.strength} x typical max {scale:.3g})"

        def intervention(m):
            return steer_feature(m, sae, args.latent, args.strength, mode=args.mode, max_activation=scale)
    else:
        caa = caa_vector(base, *CODE_COMMENT_PAIRS, hook_name=args.hook)
        label = f"CAA code->comment at {args.hook} x{args.strength} ({caa!r})"

        def intervention(m):
            return steer(m, caa.vector, args.strength, hook_name=args.hook)
    print(f"# {label}; fp32 of the embedded model is dequantized Q4_1")
    for name, m in models.items():
        plain = m.generate(prompts[0], max_new_tokens=args.max_new_tokens, do_sample=False)
        with intervention(m):
            hit = m.generate(prompts[0], max_new_tokens=args.max_new_tokens, do_sample=False)
        print(f"\n## {name}\n-- unsteered:\n{plain}\n-- steered:\n{hit}")
    result = intervention_transfer(models, intervention, prompts,
                                   lambda m: logprob_diff_measure(m, *CODE_COMMENT_TARGET))
    print(f"\nmeasure: log p({CODE_COMMENT_TARGET[0]!r}) - log p({CODE_COMMENT_TARGET[1]!r}) at the last "
          f"position, {len(prompts)} prompts, 95% bootstrap CIs")
    for name, e in result.effects.items():
        print(f"{name:>6}: effect {e.effect.value:+.3f} [{e.effect.ci_low:+.3f}, {e.effect.ci_high:+.3f}]  "
              f"ratio {e.ratio.value:.2f} [{e.ratio.ci_low:.2f}, {e.ratio.ci_high:.2f}]  "
              f"KL {e.kl.value:.4f} [{e.kl.ci_low:.4f}, {e.kl.ci_high:.4f}]")
    sys.stdout.flush()
    return 0
