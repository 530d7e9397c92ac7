"""Models on the Hugging Face Hub: a name like "org/name" where a path is expected.

    resolve("org/name")                    -> the local snapshot folder (downloaded once, then from the cache)
    resolve("org/name@v1.0")               -> a revision (branch, tag or commit)
    resolve("org/name/x070-0.1B.pth")      -> one file of the repository (official RWKV-7 repos hold many)
    model_card(config, provenance)         -> the README.md that save_pretrained / push_to_hub write
    push_folder(folder, "org/name")        -> a checkpoint folder uploaded as one commit

Downloads go through huggingface_hub (snapshot_download, hf_hub_download) with its cache, its token and its
offline mode (HF_HUB_OFFLINE=1: the cache only). A local path that exists always wins over a Hub name.
"""

from __future__ import annotations

import re
from pathlib import Path

from .errors import VisionRWKVError

_PART = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_NAME = re.compile(rf"^(?P<repo>{_PART}/{_PART})(?:/(?P<file>[^@]+?))?(?:@(?P<rev>[^/@]+))?$")


def parse(name: str) -> tuple[str, str | None, str | None] | None:
    """("org/name", file or None, revision or None), or None when name cannot be a Hub name."""
    match = _NAME.match(str(name))
    if match is None or ".." in str(name) or str(name).startswith(("./", "/")):
        return None
    return match["repo"], match["file"], match["rev"]


def resolve(name_or_path, what: str = "a checkpoint", *, revision: str | None = None, cache_dir=None,
            local_files_only: bool | None = None) -> Path:
    """A local path as it is; a Hub name as its local copy (downloaded when the cache lacks it). One line
    (VisionRWKVError) when neither exists."""
    path = Path(name_or_path)
    if path.exists():
        return path
    parsed = parse(str(name_or_path))
    if parsed is None:
        raise VisionRWKVError(f"{path} does not exist; expected {what}")
    repo, filename, rev = parsed
    kwargs = {"revision": revision or rev, "cache_dir": cache_dir}
    if local_files_only is not None:
        kwargs["local_files_only"] = local_files_only
    try:
        from huggingface_hub import hf_hub_download, snapshot_download

        if filename:
            return Path(hf_hub_download(repo, filename, **kwargs))
        return Path(snapshot_download(repo, **kwargs))
    except Exception as e:  # huggingface_hub raises a dozen kinds (offline, not found, gated, network): one line
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise VisionRWKVError(f"{name_or_path} is neither a local path nor a Hugging Face Hub model that could be "
                              f"fetched ({type(e).__name__}: {reason}); expected {what}") from None


def push_folder(folder, repo_id: str, *, private: bool | None = None, token: str | None = None,
                commit_message: str = "Upload vision_rwkv checkpoint", revision: str | None = None) -> str:
    """Create the model repository when needed and upload the folder as one commit; returns the commit URL."""
    from huggingface_hub import HfApi

    if parse(repo_id) is None or parse(repo_id)[1:] != (None, None):
        raise VisionRWKVError(f"{repo_id!r} is not a Hugging Face Hub model name; expected ORG/NAME")
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model", revision=revision,
                                 commit_message=commit_message)
    except Exception as e:  # authentication, network, permissions: one line, the folder stays as it is
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise VisionRWKVError(f"cannot push to the Hugging Face Hub model {repo_id} ({type(e).__name__}: "
                              f"{reason}); expected a login with write access (hf auth login, or HF_TOKEN)") from None
    return str(getattr(info, "commit_url", info))


# ---- the model card ---------------------------------------------------------------------------------


def model_card(config: dict, provenance: dict | None, repo_id: str | None = None) -> str:
    """README.md for a caption checkpoint: what it is, how to use it, and how it was made (its provenance)."""
    enc, proj, dec = config.get("encoder", {}), config.get("projector", {}), config.get("decoder", {})
    name = repo_id or "PATH_OR_REPO"
    p = provenance or {}
    weights = f", weights `{enc['pretrained']}`" if enc.get("pretrained") else ""
    trained = "frozen" if enc.get("freeze", True) else "fine-tuned"
    lines = [
        "---",
        "library_name: vision_rwkv",
        "pipeline_tag: image-to-text",
        "tags: [image-captioning, rwkv, rwkv7, open_clip]",
        "---",
        "",
        f"# {repo_id.split('/')[-1] if repo_id else 'vision_rwkv caption model'}",
        "",
        "An image captioner made with vision_rwkv: a frozen open_clip image encoder, a projector, and an RWKV-7 "
        "language model that continues the image prefix with a caption.",
        "",
        "| part | what |",
        "|---|---|",
        f"| encoder | open_clip `{enc.get('model')}`{weights}, {trained} |",
        f"| projector | `{proj.get('kind')}` |",
        f"| decoder | RWKV-7, {dec.get('n_layer')} layers, width {dec.get('n_embd')}, head size {dec.get('head_size')},"
        f" vocabulary {dec.get('vocab_size')} |",
        f"| tokenizer | `{config.get('tokenizer')}` |",
        "",
        "## Use",
        "",
        "```bash",
        "pip install vision_rwkv",
        f"vision-rwkv caption photo.jpg checkpoint={name}",
        "```",
        "",
        "```python",
        "from vision_rwkv import Captioner, SamplingConfig",
        f'captioner = Captioner.from_pretrained("{name}")',
        'print(next(captioner.caption_paths(["photo.jpg"], SamplingConfig())).caption)',
        "```",
    ]
    if p:
        lines += ["", "## How it was made", ""]
        if p.get("command"):
            lines += ["```bash", p["command"], "```", ""]
        facts = [("code", _code(p.get("code"))), ("data", _data(p.get("data"))),
                 ("steps", p.get("step")), ("created", p.get("created"))]
        lines += [f"- {key}: {value}" for key, value in facts if value]
        metrics = p.get("metrics") or {}
        if metrics:
            lines += ["", "| metric | value |", "|---|---|"]
            lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()]
    return "\n".join(lines) + "\n"


def _code(code: dict | None) -> str | None:
    if not code:
        return None
    text = f"vision_rwkv {code.get('version')}"
    if code.get("git_commit"):
        text += f", git commit {code['git_commit']}" + (" (with uncommitted changes)" if code.get("git_dirty") else "")
    return text


def _data(data: dict | None) -> str | None:
    if not data:
        return None
    return (f"{data.get('source')} `{data.get('path')}`, split {data.get('split')}: {data.get('images')} images, "
            f"{data.get('captions')} captions, fingerprint {data.get('fingerprint')}")
