"""Python port of MLX 0.32's custom Metal kernel source generation.

``mx.fast.metal_kernel`` only receives the kernel *body*; MLX writes the
signature, the kernel name and the template instantiation
(mlx/backend/common/metal_kernel.cpp: ``write_signature``, ``write_template``,
``make_template_hash`` and the name logic in ``metal_kernel``). Testing the
exact text MLX would compile is the point of the simulator, so this is a
line-by-line port, quirks included.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from foundry_mlx.kernels.metal_sim.dtypes import dtype_name, kernel_input, type_string

# Inputs with fewer elements are passed in the constant address space.
MAX_CONSTANT_ARRAY_SIZE = 8

# Attributes MLX adds when their name occurs in the source, in this order.
METAL_ATTRIBUTES: tuple[tuple[str, str], ...] = (
    ("dispatch_quadgroups_per_threadgroup", "uint"),
    ("dispatch_simdgroups_per_threadgroup", "uint"),
    ("dispatch_threads_per_threadgroup", "uint3"),
    ("grid_origin", "uint3"),
    ("grid_size", "uint3"),
    ("quadgroup_index_in_threadgroup", "uint"),
    ("quadgroups_per_threadgroup", "uint"),
    ("simdgroup_index_in_threadgroup", "uint"),
    ("simdgroups_per_threadgroup", "uint"),
    ("thread_execution_width", "uint"),
    ("thread_index_in_quadgroup", "uint"),
    ("thread_index_in_simdgroup", "uint"),
    ("thread_index_in_threadgroup", "uint"),
    ("thread_position_in_grid", "uint3"),
    ("thread_position_in_threadgroup", "uint3"),
    ("threadgroup_position_in_grid", "uint3"),
    ("threadgroups_per_grid", "uint3"),
    ("threads_per_grid", "uint3"),
    ("threads_per_simdgroup", "uint"),
    ("threads_per_threadgroup", "uint3"),
)


@dataclass(frozen=True)
class Parameter:
    """One kernel parameter: ``declared_type`` as written in the signature
    (e.g. ``const device float*``); ``kind`` is input, shape, strides, ndim,
    output or attribute; ``index`` is the input/output position."""

    declared_type: str
    name: str
    kind: str
    index: int


@dataclass(frozen=True)
class KernelSource:
    """What MLX would compile, plus what the driver needs to call it."""

    kernel_name: str
    source: str
    template_definition: str  # "<8, float>" or ""
    instantiation: str  # the trailing explicit-instantiation text, or ""
    parameters: tuple[Parameter, ...]


@dataclass(frozen=True)
class InputInfo:
    """Shape-level facts about an input that change the generated source."""

    dtype: str
    ndim: int
    size: int


def template_arguments(
    template: Sequence[tuple[str, Any]],
) -> list[tuple[str, str, str]]:
    """(name, parameter kind, rendered value) per template argument, checked
    as the Python binding does: bool before int, then a dtype."""
    rendered = []
    for name, value in template:
        if isinstance(value, (bool, np.bool_)):
            rendered.append((name, "bool", "1" if value else "0"))
        elif isinstance(value, (int, np.integer)):
            if not -(2**31) <= int(value) < 2**31:
                raise OverflowError(f"template argument {name}={value} overflows int")
            rendered.append((name, "int", str(int(value))))
        else:
            try:
                rendered.append((name, "typename", type_string(value)))
            except TypeError:
                raise TypeError(
                    "[metal_kernel] Invalid template argument. Must be `mlx.core.Dtype`, `int` or `bool`."
                ) from None
    return rendered


def make_template_hash(template_definition: str) -> str:
    """``<8, float>`` -> ``_8_float`` exactly as MLX builds it."""
    characters = []
    index = 0
    while index < len(template_definition):
        character = template_definition[index]
        if character in "<>":
            characters.append("_")
        elif character == "," and index + 1 < len(template_definition) and template_definition[index + 1] == " ":
            characters.append("_")
            index += 1
        else:
            characters.append(character)
        index += 1
    return "".join(characters)[:-1]


def build_kernel_source(
    name: str,
    input_names: Sequence[str],
    output_names: Sequence[str],
    source: str,
    header: str,
    inputs: Sequence[InputInfo],
    output_dtypes: Sequence[Any],
    template: Sequence[tuple[str, Any]] = (),
    atomic_outputs: bool = False,
) -> KernelSource:
    """Kernel name, full source and parameter list for one call of a kernel."""
    if not output_names:
        raise ValueError("[metal_kernel] Must specify at least one output.")
    for label, actual, expected in (
        ("inputs", len(inputs), len(input_names)),
        ("output_dtypes", len(output_dtypes), len(output_names)),
    ):
        if actual != expected:
            raise ValueError(f"[metal_kernel] Expected `{label}` to have size {expected} but got size {actual}.")
    output_types = [type_string(dtype) for dtype in output_dtypes]
    shape_infos = [(f"{n}_shape" in source, f"{n}_strides" in source, f"{n}_ndim" in source) for n in input_names]
    attributes = [(a, t) for a, t in METAL_ATTRIBUTES if a in source]
    arguments = template_arguments(template)

    kernel_name = "custom_kernel_" + name
    template_definition = ""
    if arguments:
        template_definition = "<" + ", ".join(v for _, _, v in arguments) + ">"
        kernel_name += "_" + make_template_hash(template_definition)
    for info in inputs:
        kernel_name += "_" + type_string(info.dtype)
        if info.ndim == 0:
            kernel_name += "s"
        elif info.size < MAX_CONSTANT_ARRAY_SIZE:
            kernel_name += "c"
    for type_name in output_types:
        kernel_name += "_" + type_name

    # write_signature
    text = header
    parameters: list[Parameter] = []
    if arguments:
        text += "template <" + ", ".join(f"{k} {n}" for n, k, _ in arguments) + ">\n"
    text += "[[kernel]] void " + kernel_name + "(\n"
    index = 0
    for position, (input_name, info) in enumerate(zip(input_names, inputs, strict=True)):
        location = "constant" if info.size < MAX_CONSTANT_ARRAY_SIZE else "device"
        reference = "&" if info.ndim == 0 else "*"
        declared = f"const {location} {type_string(info.dtype)}{reference}"
        text += f"  {declared} {input_name} [[buffer({index})]],\n"
        parameters.append(Parameter(declared, input_name, "input", position))
        index += 1
        if info.ndim > 0:
            for flag, suffix, declared in zip(
                shape_infos[position],
                ("shape", "strides", "ndim"),
                ("const constant int*", "const constant int64_t*", "const constant int&"),
                strict=True,
            ):
                if flag:
                    extra = f"{input_name}_{suffix}"
                    text += f"  {declared} {extra} [[buffer({index})]],\n"
                    parameters.append(Parameter(declared, extra, suffix, position))
                    index += 1
    for position, (output_name, type_name) in enumerate(zip(output_names, output_types, strict=True)):
        element = f"atomic<{type_name}>" if atomic_outputs else type_name
        declared = f"device {element}*"
        text += f"  {declared} {output_name} [[buffer({index})]]"
        # MLX compares the buffer index (which counts shape/strides/ndim
        # buffers) with inputs + outputs - 1; kept as is.
        if index < len(inputs) + len(output_names) - 1 or attributes:
            text += ",\n"
        else:
            text += ") {\n"
        parameters.append(Parameter(declared, output_name, "output", position))
        index += 1
    for position, (attribute, type_name) in enumerate(attributes):
        text += f"  {type_name} {attribute} [[{attribute}]]"
        text += ",\n" if position < len(attributes) - 1 else ") {\n"
        parameters.append(Parameter(type_name, attribute, "attribute", position))
    text += source
    text += "\n}\n"

    instantiation = ""
    if arguments:
        instance = kernel_name + template_definition
        instantiation = f'\ntemplate [[host_name("{kernel_name}")]] [[kernel]] decltype({instance}) {instance};\n'
    return KernelSource(
        kernel_name=kernel_name,
        source=text + instantiation,
        template_definition=template_definition,
        instantiation=instantiation,
        parameters=tuple(parameters),
    )


def input_infos(inputs: Sequence[Any]) -> list[InputInfo]:
    """Dtype/ndim/size of each kernel input as MLX would convert it."""
    infos = []
    for value in inputs:
        name, array = kernel_input(value)
        infos.append(InputInfo(name, array.ndim, int(array.size)))
    return infos


def metal_signature(
    name: str,
    input_names: Sequence[str],
    output_names: Sequence[str],
    source: str,
    header: str,
    inputs: Sequence[Any],
    output_dtypes: Sequence[Any],
    template: Sequence[tuple[str, Any]] = (),
    atomic_outputs: bool = False,
) -> tuple[str, str]:
    """(kernel name, full source) that ``mx.fast.metal_kernel`` builds for
    these inputs: what ``verbose=True`` prints, without MLX's utils prefix."""
    output_dtype_names = [dtype_name(dtype) for dtype in output_dtypes]
    kernel = build_kernel_source(
        name,
        input_names,
        output_names,
        source,
        header,
        input_infos(inputs),
        output_dtype_names,
        template,
        atomic_outputs,
    )
    return kernel.kernel_name, kernel.source
