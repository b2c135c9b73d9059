"""22 JSON schemas for the structured-outputs tests (written once, not tuned to pass).

They cover what extraction and tool-calling clients send: nested objects, arrays (with and
without bounds), enums, numbers and integers with bounds, required fields, `additionalProperties:
false`, optional fields, const, nullable unions, anyOf and $defs references. Shared by
tests/engine (tiny and real model) and tests/serve.
"""

SCHEMAS: list[dict] = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 16},
                                      "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"sentiment": {"enum": ["positive", "negative", "neutral"]}},
     "required": ["sentiment"], "additionalProperties": False},
    {"type": "object", "properties": {"score": {"type": "number", "minimum": 0, "maximum": 1}},
     "required": ["score"], "additionalProperties": False},
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string", "maxLength": 8},
                                               "minItems": 1, "maxItems": 3}},
     "required": ["tags"], "additionalProperties": False},
    {"type": "object", "properties": {
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                     "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["city", "zip"], "additionalProperties": False}},
     "required": ["address"], "additionalProperties": False},
    {"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 5}, "minItems": 2, "maxItems": 4},
    {"type": "object", "properties": {"ok": {"type": "boolean"}, "note": {"type": ["string", "null"], "maxLength": 10}},
     "required": ["ok", "note"], "additionalProperties": False},
    {"type": "object", "properties": {"kind": {"const": "point"}, "x": {"type": "integer", "minimum": 0, "maximum": 99},
                                      "y": {"type": "integer", "minimum": 0, "maximum": 99}},
     "required": ["kind", "x", "y"], "additionalProperties": False},
    {"type": "object", "properties": {"items": {"type": "array", "maxItems": 2, "items": {
        "type": "object", "properties": {"sku": {"type": "string", "maxLength": 6},
                                         "qty": {"type": "integer", "minimum": 1, "maximum": 9}},
        "required": ["sku", "qty"], "additionalProperties": False}}},
     "required": ["items"], "additionalProperties": False},
    {"type": "string", "enum": ["red", "green", "blue"]},
    {"type": "integer", "minimum": 10, "maximum": 20},
    {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9},
                                      "b": {"type": "integer", "minimum": 0, "maximum": 9}},
     "required": ["a"], "additionalProperties": False},
    {"type": "object", "properties": {"value": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9},
                                                          {"type": "boolean"}]}},
     "required": ["value"], "additionalProperties": False},
    {"$defs": {"person": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10}},
                          "required": ["name"], "additionalProperties": False}},
     "type": "object", "properties": {"author": {"$ref": "#/$defs/person"},
                                      "editor": {"$ref": "#/$defs/person"}},
     "required": ["author", "editor"], "additionalProperties": False},
    {"type": "object", "properties": {"matrix": {"type": "array", "maxItems": 2, "items": {
        "type": "array", "maxItems": 2, "items": {"type": "integer", "minimum": 0, "maximum": 9}}}},
     "required": ["matrix"], "additionalProperties": False},
    {"type": "object", "properties": {"temperature": {"type": "number", "minimum": -50, "maximum": 50},
                                      "unit": {"enum": ["C", "F"]}},
     "required": ["temperature", "unit"], "additionalProperties": False},
    {"type": "object", "properties": {"level": {"type": "integer", "enum": [1, 2, 3]},
                                      "label": {"type": "string", "enum": ["low", "mid", "high"]}},
     "required": ["level", "label"], "additionalProperties": False},
    {"type": "object", "properties": {"date": {"type": "string", "pattern": "^20[0-9]{2}-[01][0-9]-[0-3][0-9]$"}},
     "required": ["date"], "additionalProperties": False},
    {"type": "object", "properties": {"flags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
                                      "count": {"type": "integer", "minimum": 0, "maximum": 3}},
     "required": ["flags", "count"], "additionalProperties": False},
    {"type": "object", "properties": {"meta": {"type": "object", "properties": {
        "version": {"type": "integer", "minimum": 1, "maximum": 3},
        "stable": {"type": "boolean"}}, "required": ["version", "stable"], "additionalProperties": False},
        "name": {"type": "string", "maxLength": 12}},
     "required": ["meta", "name"], "additionalProperties": False},
    {"type": "boolean"},
    {"type": "object", "properties": {"choice": {"enum": ["A", "B", "C", "D"]},
                                      "confidence": {"type": "number", "minimum": 0, "maximum": 100}},
     "required": ["choice", "confidence"], "additionalProperties": False},
]
