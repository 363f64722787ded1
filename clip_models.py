"""open_clip, the optional package of the CLIP backbones (backbones.py) and CLIPScore (clip_score.py): its import,
the activation each pretrained tag was trained with, and the files of its weights.

    open_clip = import_open_clip()                        # a ToolkitError saying `pip install open-clip-torch`
    tags = weight_tags("ViT-B-16", quick_gelu=True)       # ('openai', 'dfn2b', 'metaclip_400m', ...)
    path = weights_file("ViT-B-16", "openai")             # downloads once into Hugging Face's cache
    path = cached_weights_file("ViT-B-32", "openai")      # no network: the cached file or None

OpenAI's CLIP models use QuickGELU, most later ones (LAION, DataComp) GELU; open_clip builds "ViT-B-16" with
GELU whatever its weights, so the activation is chosen here from the tag's configuration.
"""
import os

from utils import ToolkitError, error_summary

INSTALL = "pip install open-clip-torch"


def import_open_clip():
    """The open_clip module; a ToolkitError saying how to install it when it is missing."""
    try:
        import open_clip
    except ImportError as error:
        raise ToolkitError(f"the CLIP models need the open_clip package, which cannot be imported "
                           f"({error_summary(error)}): {INSTALL}") from None
    return open_clip


def quick_gelu(model_name, tag):
    """Whether open_clip's weights `tag` of `model_name` were trained with QuickGELU (OpenAI's activation)."""
    return bool(import_open_clip().get_pretrained_cfg(model_name, tag).get("quick_gelu", False))


def weight_tags(model_name, quick_gelu_blocks):
    """open_clip's pretrained tags of `model_name` trained with the activation of blocks built with
    quick_gelu=quick_gelu_blocks (weights of the other activation would load, and compute something else)."""
    tags = import_open_clip().list_pretrained_tags_by_model(model_name)
    return tuple(tag for tag in tags if quick_gelu(model_name, tag) == quick_gelu_blocks)


def weights_file(model_name, tag):
    """The local file of open_clip's weights `tag` of `model_name`, downloaded into Hugging Face's cache the
    first time; a ToolkitError saying how to work offline when it cannot be fetched."""
    open_clip = import_open_clip()
    try:
        return open_clip.download_pretrained(open_clip.get_pretrained_cfg(model_name, tag))
    except Exception as error:  # huggingface_hub and urllib raise many types (OSError, HTTP errors...)
        raise ToolkitError(f"cannot fetch open_clip's {model_name} weights {tag!r} ({error_summary(error)}). "
                           f"They need internet once (then Hugging Face's cache, ~/.cache/huggingface, holds them); "
                           f"without it, download open_clip_pytorch_model.bin of that model elsewhere and pass its "
                           f"path as the weights, or use weights=None for random weights") from None


def cached_weights_file(model_name, tag):
    """The file of open_clip's weights `tag` of `model_name` if Hugging Face's cache holds it, else None.
    Never touches the network (offline, a download attempt retries for about a minute)."""
    import huggingface_hub

    hub_path = import_open_clip().get_pretrained_cfg(model_name, tag).get("hf_hub", "")
    if not hub_path:
        return None
    repo_id, filename = os.path.split(hub_path)  # "org/model/" (the default file name) or "org/model/file"
    filename = filename or "open_clip_pytorch_model.bin"
    safetensors = os.path.splitext(filename)[0].replace("pytorch_model", "model") + ".safetensors"
    for name in (safetensors, filename):  # open_clip prefers the safetensors file
        path = huggingface_hub.try_to_load_from_cache(repo_id, name)
        if isinstance(path, str):
            return path
    return None
