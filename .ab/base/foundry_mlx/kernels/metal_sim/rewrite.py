"""The only textual changes made to MLX's kernel source before compiling it as
C++, and the generated driver that calls the kernel for one thread.

1. ``threadgroup T name[N]...;`` declarations become references into the
   runtime's per-threadgroup arena, so every thread of a threadgroup shares
   them and each threadgroup starts from poison::

       threadgroup float partial[32];
       float (&partial)[32] = ::metal_sim_detail::threadgroup_variable<
           float[32], __COUNTER__>();            (on one line)

   Everything else named ``threadgroup`` (pointer qualifiers in parameters and
   casts) is left to the shim's empty ``#define threadgroup``. Comments and
   string literals are never rewritten, and line numbers are preserved.
2. The explicit instantiation MLX appends loses its attribute lists, which
   clang rejects on an explicit instantiation
   (``template [[host_name("k")]] [[kernel]] decltype(k<..>) k<..>;``).
3. ``#include <metal_stdlib>`` (any ``<metal_*>`` header) becomes a comment:
   the shim already declares what those headers would.
"""

from __future__ import annotations

import re

from foundry_mlx.kernels.metal_sim.signature import KernelSource

_COMMENT_OR_STRING = re.compile(r"//[^\n]*|/\*.*?\*/|\"(?:\\.|[^\"\\\n])*\"|'(?:\\.|[^'\\\n])*'", re.DOTALL)
_METAL_INCLUDE = re.compile(r"^[ \t]*#[ \t]*include[ \t]*<metal_\w+>", re.MULTILINE)
_ALIAS = re.compile(r"^[ \t]*#[ \t]*define[ \t]+([A-Za-z_]\w*)[ \t]+threadgroup[ \t]*$", re.MULTILINE)
_DECLARATOR = re.compile(r"(?<!\w)(?P<name>[A-Za-z_]\w*)\s*(?P<dims>(?:\[[^\[\]]*\]\s*)*)$", re.DOTALL)


def _blank(match: re.Match[str]) -> str:
    """Same-length filler for a comment or literal, keeping its newlines."""
    return re.sub(r"[^\n]", " ", match.group(0))


def _code_only(text: str) -> str:
    """``text`` with comments and string/char literals blanked out."""
    return _COMMENT_OR_STRING.sub(_blank, text)


def _split_top_level(statement: str) -> list[str] | None:
    """Split a declaration on top-level commas; None when the statement is not
    a plain storage declaration (it has an initialiser, a pointer, a call...)."""
    parts = []
    depth_square = depth_angle = 0
    start = 0
    for position, character in enumerate(statement):
        if character == "[":
            depth_square += 1
        elif character == "]":
            depth_square -= 1
        elif depth_square == 0:
            if character == "<":
                depth_angle += 1
            elif character == ">":
                depth_angle -= 1
            elif character in "(){}=*&#;":
                return None
            elif character == "," and depth_angle == 0:
                parts.append(statement[start:position])
                start = position + 1
    parts.append(statement[start:])
    return parts


def _rewrite_statement(statement: str) -> str | None:
    """C++ for one ``threadgroup`` declaration (text after the keyword, before
    ';'), or None when it is not a threadgroup storage declaration."""
    declarators = _split_top_level(statement)
    if declarators is None:
        return None
    first = _DECLARATOR.search(declarators[0].strip())
    if first is None:
        return None
    leading = declarators[0].strip()
    element_type = leading[: first.start()].strip()
    if not element_type or element_type.endswith(("::", "<", ",")):
        return None
    pieces = []
    for declarator in [leading[first.start() :], *declarators[1:]]:
        match = _DECLARATOR.fullmatch(declarator.strip())
        if match is None:
            return None
        name = match.group("name")
        dims = re.sub(r"\s+", " ", match.group("dims")).strip()
        pieces.append(
            f"{element_type} (&{name}){dims} = ::metal_sim_detail::"
            f"threadgroup_variable<{element_type}{dims}, __COUNTER__>();"
        )
    return " ".join(pieces)


def rewrite_threadgroup_declarations(text: str) -> str:
    """Turn threadgroup storage declarations into shared arena references.

    A declaration may also start with an object-like macro defined as exactly
    ``threadgroup`` (``#define SHARED threadgroup``, as portable kernel
    sources do); declarations hidden behind other macros are not seen."""
    code = _code_only(text)
    names = ["threadgroup", *_ALIAS.findall(code)]
    keywords = re.compile(r"\b(?:" + "|".join(names) + r")\b(?=\s)")
    pieces = []
    cursor = 0
    for keyword in keywords.finditer(code):
        line_start = code.rfind("\n", 0, keyword.start()) + 1
        if keyword.start() < cursor or code[line_start : keyword.start()].lstrip().startswith("#"):
            continue  # inside a preprocessor directive
        end = code.find(";", keyword.end())
        if end < 0:
            break
        statement = code[keyword.end() : end]
        if re.search(r"\n[ \t]*#", statement):
            continue
        replacement = _rewrite_statement(statement)
        if replacement is None:
            continue
        original = text[keyword.start() : end + 1]
        pieces.append(text[cursor : keyword.start()])
        pieces.append(replacement + "\n" * original.count("\n"))
        cursor = end + 1
    pieces.append(text[cursor:])
    return "".join(pieces)


def compilable_source(kernel: KernelSource) -> str:
    """MLX's source with the mechanical changes described above."""
    body = kernel.source[: len(kernel.source) - len(kernel.instantiation)]
    body = _METAL_INCLUDE.sub(lambda match: "// metal_sim: " + match.group(0).strip(), body)
    body = rewrite_threadgroup_declarations(body)
    if kernel.instantiation:
        instance = kernel.kernel_name + kernel.template_definition
        body += f"\ntemplate decltype({instance}) {instance};\n"
    return body


def driver_source(kernel: KernelSource) -> str:
    """C++ translation unit: shim, kernel (line numbers as MLX's source, file
    ``<kernel name>.metal``) and the per-thread entry point."""
    arguments = []
    buffer_index = 0
    for parameter in kernel.parameters:
        if parameter.kind == "attribute":
            arguments.append(f"attributes->{parameter.name}")
            continue
        declared = parameter.declared_type
        if declared.endswith("&"):
            arguments.append(f"*({declared[:-1]}*)buffers[{buffer_index}]")
        else:
            arguments.append(f"({declared})buffers[{buffer_index}]")
        buffer_index += 1
    callee = kernel.kernel_name + kernel.template_definition
    call = ",\n      ".join(arguments)
    return (
        '#include "msl_shim.h"\n'
        f'#line 1 "{kernel.kernel_name}.metal"\n'
        f"{compilable_source(kernel)}\n"
        '#line 1 "metal_sim_driver.cpp"\n'
        'extern "C" void metal_sim_kernel_entry(\n'
        "    void* const* buffers, const metal_sim::Attributes* attributes) {\n"
        "  (void)buffers;\n"
        "  (void)attributes;\n"
        f"  {callee}(\n      {call});\n"
        "}\n"
    )
