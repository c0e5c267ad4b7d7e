"""ControlNet inputs as plain data: a job's list of dicts checked against the served ControlNets, and turned into the
pipeline's ControlNetInput in the worker.

A job carries `blockwise_controlnet_inputs` as [{"image": PIL, "scale": 1.0, "start": 1.0, "end": 0.0,
"controlnet": "canny", "inpaint_mask": PIL}, ...]: the same fields as ControlNetInput, except that the ControlNet
is named (a name the server was started with, or its index among them) rather than given by `controlnet_id`,
since a caller of the HTTP API or the UI does not know the order the worker loaded them in. `resolve` (engine side,
before queueing) checks each dict and writes the index back as `controlnet_id`; `control_inputs` (worker side)
makes the ControlNetInputs that pipe(...) takes. Numbers and images are checked by the pipeline's own rules
(request.build_request), which `validate` runs on the result.
"""

from __future__ import annotations

from ..conditioning.control import ControlNetInput
from ..validation import InputError, shown

NAME = "blockwise_controlnet_inputs"
FIELDS = ("image", "scale", "start", "end", "controlnet", "controlnet_id", "inpaint_mask")
INPAINT = "inpaint"  # a ControlNet served under this name repaints: its inputs need an inpaint_mask


def _index(k: int, item: dict, names: tuple[str, ...]) -> int:
    """The served ControlNet an item names (by name or index; the first when it names none)."""
    given = item.get("controlnet", item.get("controlnet_id", 0))
    if isinstance(given, str) and given in names:
        return names.index(given)
    if isinstance(given, int) and not isinstance(given, bool) and 0 <= given < len(names):
        return given
    raise InputError(f"{NAME}[{k}].controlnet: {shown(given)} is not a ControlNet this server loads; give one of "
                     f"{', '.join(names)} (or its index 0..{len(names) - 1})")


def resolve(inputs, names: tuple[str, ...]) -> list[dict]:
    """The job's ControlNet inputs with each ControlNet's index in `controlnet_id` (InputError for a bad one)."""
    if not isinstance(inputs, (list, tuple)):
        raise InputError(f"{NAME} must be a list of {{image, scale, start, end, controlnet}} objects, got "
                         f"{shown(inputs)}")
    if inputs and not names:
        raise InputError(f"{NAME}: this server loads no ControlNet; start it with --controlnet KIND=SOURCE "
                         "(e.g. --controlnet canny)")
    resolved = []
    for k, item in enumerate(inputs):
        if not isinstance(item, dict):
            raise InputError(f"{NAME}[{k}] must be an object with image, scale, start, end and controlnet, got "
                             f"{shown(item)}")
        unknown = sorted(set(item) - set(FIELDS))
        if unknown:
            raise InputError(f"{NAME}[{k}]: unknown field {unknown[0]!r}; an input takes {', '.join(FIELDS)}")
        index = _index(k, item, names)
        if names[index] == INPAINT and item.get("inpaint_mask") is None:
            raise InputError(f"{NAME}[{k}]: the inpaint ControlNet needs an inpaint_mask (white = repaint)")
        fields = {key: value for key, value in item.items() if key not in ("controlnet", "controlnet_id")}
        resolved.append({**fields, "controlnet_id": index})
    return resolved


def control_inputs(inputs: list[dict]) -> list[ControlNetInput]:
    """Resolved dicts (see `resolve`) as the pipeline's ControlNetInputs."""
    return [ControlNetInput(**item) for item in inputs]


def with_control_inputs(arguments: dict) -> dict:
    """pipe(...)'s arguments with the resolved ControlNet dicts made ControlNetInputs (the worker's last step)."""
    if not arguments.get(NAME):
        return arguments
    return {**arguments, NAME: control_inputs(arguments[NAME])}
