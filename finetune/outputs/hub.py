"""--push_to_hub: checked before anything loads (offline mode, token, reachability), then the finished output
directories are uploaded once at the end: --output_dir to --hub_model_id, --merged_output_dir to <id>-merged.

The Trainer's own pushing is switched off (training/trainer.py gives it push_to_hub=False): it would push the
working directory, with its checkpoints and prepared data, at every save."""

from __future__ import annotations

import logging
import os
from typing import Optional

logger = logging.getLogger(__name__)

HUB_PROBE_TIMEOUT_S = 5
NOT_UPLOADED = ["completed", ".final-tmp-*", "*.tmp", "*.tmp-*"]  # local bookkeeping and interrupted writes


def hub_repo_id(args) -> str:
    return args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir))


def hub_token(args) -> Optional[str]:
    from huggingface_hub import get_token

    return args.hub_token or get_token()


def offline_mode() -> bool:
    return any(os.environ.get(name, "").upper() in ("1", "ON", "YES", "TRUE")
               for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_push_problem(args) -> Optional[str]:
    """Why --push_to_hub cannot work here (checked before anything loads), or None: offline mode, no token,
    an unreachable hub or a rejected token (one request, HUB_PROBE_TIMEOUT_S seconds at most)."""
    if offline_mode():
        return ("--push_to_hub: HF_HUB_OFFLINE is set, so nothing can be uploaded; unset HF_HUB_OFFLINE (and "
                "TRANSFORMERS_OFFLINE) to push, or drop --push_to_hub (the outputs stay in --output_dir)")
    token = hub_token(args)
    if not token:
        return ("--push_to_hub: no Hugging Face token; run `hf auth login`, set HF_TOKEN or pass --hub_token, "
                "or drop --push_to_hub")
    import httpx
    from huggingface_hub import constants

    try:
        response = httpx.get(f"{constants.ENDPOINT}/api/whoami-v2", headers={"authorization": f"Bearer {token}"},
                             timeout=HUB_PROBE_TIMEOUT_S)
    except httpx.HTTPError as error:
        return (f"--push_to_hub: the hub at {constants.ENDPOINT} is unreachable ({type(error).__name__}: {error}); "
                "check the network (or HF_ENDPOINT), or drop --push_to_hub")
    if response.status_code == 401:
        return ("--push_to_hub: the hub rejected the token (HTTP 401); create a write token and set HF_TOKEN, or "
                "drop --push_to_hub")
    return None


def hub_targets(args, paths) -> list[tuple[str, str]]:
    repo = hub_repo_id(args)
    targets = [(paths.final, repo)]
    if paths.merged and os.path.isfile(os.path.join(paths.merged, "config.json")):
        targets.append((paths.merged, f"{repo}-merged"))
    return targets


def push_outputs(args, paths) -> bool:
    """Upload the final directory to --hub_model_id and the merged one to <hub_model_id>-merged (rank 0).
    False (after an error line) when the push fails; the outputs are complete locally and a re-run retries."""
    if not args.push_to_hub:
        return True
    from huggingface_hub import HfApi

    api = HfApi(token=hub_token(args))
    for folder, repo_id in hub_targets(args, paths):
        try:
            url = api.create_repo(repo_id, private=args.hub_private_repo, exist_ok=True, repo_type="model")
            api.upload_folder(repo_id=url.repo_id, folder_path=folder, repo_type="model", revision=args.hub_revision,
                              commit_message=f"train.py: {os.path.basename(os.path.abspath(folder))}",
                              ignore_patterns=NOT_UPLOADED)
        except Exception as error:  # huggingface_hub raises HfHubHTTPError, httpx errors, OSError...
            logger.error("--push_to_hub: uploading %s to %s failed (%s: %s); the outputs are complete there, run "
                         "the same command again to retry the push", folder, repo_id, type(error).__name__,
                         str(error).splitlines()[0] if str(error) else "")
            return False
        logger.info("pushed %s to %s", folder, getattr(url, "url", repo_id))
    return True
