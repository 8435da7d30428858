"""``--journal PATH`` and ``--resume`` for the fine-tuning examples: every step recorded, a stopped run continued.

``mezo_finetune.py``, ``mezo_hf.py`` and ``lowrank_finetune.py`` record each step in a seed journal
(:mod:`zo_kernels.journal`) after applying it; ``--resume`` replays the journal into the freshly
initialised model (the same ``--seed``, checked against the journal's fingerprint), draws and drops
what the replayed steps drew from the generators, and continues: bit for bit an uninterrupted run.
"""

from __future__ import annotations

import argparse
import os
from typing import Any, Callable, Optional, Tuple

from zo_kernels.journal import Journal, replay


def add_options(parser: argparse.ArgumentParser) -> None:
    """Add ``--journal PATH`` and ``--resume`` to ``parser``."""
    parser.add_argument("--journal", default=None, help="record every step in this seed journal")
    parser.add_argument("--resume", action="store_true", help="replay --journal, then continue to --steps")


def check_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """``args``, or a usage error: ``--resume`` without ``--journal``, a journal that exists without ``--resume``, or
    a journal of an in-place run (``--perturb inplace``, where the example has it: its restores round in a way no
    record holds, so a replay could not match)."""
    if args.resume and not args.journal:
        parser.error("--resume needs --journal")
    if args.journal and getattr(args, "perturb", None) == "inplace":
        parser.error("--journal needs a run that replays bit for bit: --perturb on_use or copy, not inplace")
    if args.journal and not args.resume and os.path.exists(args.journal):
        parser.error(f"--journal {args.journal} exists: pass --resume to continue it, or remove it")
    return args


def open_journal(
    args: argparse.Namespace, params: Any, stepper: Any, skip_step: Callable[[], None]
) -> Tuple[Optional[Journal], int]:
    """The journal to append to (None without ``--journal``) and the first step to run.

    With ``--resume`` the journal's steps are replayed into ``params`` (and ``stepper``'s state), and
    ``skip_step()`` runs once per replayed step: it draws and drops what that step drew from the
    generators, so that they continue where the interrupted run left them.
    """
    first = 1
    if args.resume and os.path.exists(args.journal):
        done = replay(args.journal, params, stepper)
        for _ in range(done):
            skip_step()
        first = done + 1
        print(f"resumed: replayed {done} steps from {args.journal}")
    return (Journal(args.journal, params, stepper) if args.journal else None), first
