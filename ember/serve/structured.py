"""A request's structured-outputs fields -> one StructuredOutputsParams (or a 400 naming the field).

    so = structured_outputs_of(req)      # None when the request sets none of them

Accepted spellings, all on both routes (as vLLM accepts them):
    response_format   {"type": "json_object"} | {"type": "json_schema", "json_schema": {"name", "schema", "strict"}}
    structured_outputs {"json" | "json_object" | "regex" | "choice" | "grammar": ...}     (vLLM >= 0.10)
    guided_json / guided_regex / guided_choice / guided_grammar (+ guided_whitespace_pattern)  (older vLLM)
Two of them at once is ambiguous and refused, rather than one silently winning.
"""

from __future__ import annotations

from typing import Any

from ember.engine.structured_outputs import StructuredOutputsError, StructuredOutputsParams
from ember.serve.errors import bad_request
from ember.serve.protocol import SamplingFields

_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}


def structured_outputs_of(req: SamplingFields) -> StructuredOutputsParams | None:
    """The one constraint the request asks for; see the module docstring."""
    found: list[tuple[str, dict[str, Any]]] = []
    rf = req.response_format
    if rf is not None and rf.type == "json_object":
        found.append(("response_format", {"json_object": True}))
    elif rf is not None and rf.type == "json_schema":
        if rf.json_schema is None:
            raise bad_request("response_format: type json_schema needs a json_schema object with a name and a "
                              "schema", "response_format")
        # OpenAI's schema is optional (an absent one allows any JSON object)
        schema = rf.json_schema.schema_ if rf.json_schema.schema_ is not None else {"type": "object"}
        found.append(("response_format", {"json": schema}))
    if req.structured_outputs is not None:
        so = req.structured_outputs  # its unknown fields are ignored, as everywhere
        found.append(("structured_outputs", so.model_dump(by_alias=True, exclude_none=True,
                                                          exclude=set(so.model_extra or ()))))
    for name, kind in _GUIDED.items():
        value = getattr(req, name)
        if value is not None:
            found.append((name, {kind: value}))
    if not found:
        return None  # a lone guided_whitespace_pattern shapes nothing (vLLM ignores it too)
    if len(found) > 1:
        names = ", ".join(dict.fromkeys(name for name, _ in found))
        raise bad_request(f"give one structured-outputs constraint, got several ({names})", found[1][0])
    param, fields = found[0]
    if req.guided_whitespace_pattern is not None:
        fields["whitespace_pattern"] = req.guided_whitespace_pattern
    try:
        return StructuredOutputsParams(**fields)
    except StructuredOutputsError as e:
        raise bad_request(str(e), param) from None
