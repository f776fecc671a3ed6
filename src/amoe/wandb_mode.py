"""When and how W&B logs: a mode for ``--wandb`` that never prompts (shared by every ``amoe`` command)."""

from __future__ import annotations

import logging
import os

log = logging.getLogger("amoe")


def wandb_credentials() -> bool:
    """Whether W&B can log in without asking: WANDB_API_KEY, or a key stored by ``wandb login`` (~/.netrc)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        import netrc

        host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].rstrip("/")
        return netrc.netrc(os.environ.get("NETRC") or None).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def wandb_wanted(mode: str) -> str | None:
    """The W&B mode for --wandb; never one that prompts.

    auto: online with credentials (WANDB_API_KEY or ``wandb login``), otherwise offline (``wandb sync`` the
    run directory later); off when WANDB_MODE=disabled. online without credentials falls back to offline
    with a warning. disabled: no W&B logger. The CSV logger is always on.
    """
    env = os.environ.get("WANDB_MODE", "").lower()
    if mode == "disabled" or (mode == "auto" and env == "disabled"):
        return None
    if mode == "auto":
        return "offline" if env in ("offline", "dryrun") or not wandb_credentials() else "online"
    if mode == "online" and not wandb_credentials():
        log.warning("--wandb online: no W&B credentials (WANDB_API_KEY or `wandb login`); logging offline instead.")
        return "offline"
    return mode
