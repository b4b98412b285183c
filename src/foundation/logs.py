"""open_clip logs on the root logger: an INFO line for every step of building a model, and a warning
that a model is "initialized randomly" — which every one of our models is, before its checkpoint fills
it. This filter keeps our logs readable; open_clip's warnings and errors still pass."""
import logging
import warnings


def open_clip_chatter(record: logging.LogRecord) -> bool:
    """logging filter: False for open_clip's INFO lines and its random-init warning."""
    if "open_clip" in record.pathname and record.levelno < logging.WARNING:
        return False
    return not str(record.msg).startswith("No pretrained weights loaded")


def quiet_open_clip(handlers=None) -> None:
    for handler in handlers if handlers is not None else logging.getLogger().handlers:
        handler.addFilter(open_clip_chatter)
    # open_clip's ClipLoss calls torch.distributed.nn.all_gather, deprecated in torch 2.14 but still correct
    warnings.filterwarnings("ignore", message=".*torch.distributed.nn.functional.all_gather is deprecated.*")
