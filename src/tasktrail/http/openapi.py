"""What the OpenAPI schema says that Litestar cannot infer: the JSON objects tasks carry, and the API key."""

from __future__ import annotations

import dataclasses
from typing import Any

from litestar.openapi import OpenAPIConfig
from litestar.openapi.spec import Components, OpenAPIType, Reference, Schema, SecurityScheme
from litestar.plugins import OpenAPISchemaPlugin
from litestar.typing import FieldDefinition

from tasktrail.http.body import MAX_JSON_BYTES, MAX_JSON_DEPTH

NO_NUL = "^[^\\x00]*$"

# jsonb cannot hold NUL, so no key or string at any depth may contain one.
JSON_VALUE = Schema(
    one_of=[
        Schema(type=OpenAPIType.STRING, pattern=NO_NUL),
        Schema(type=OpenAPIType.NUMBER),
        Schema(type=OpenAPIType.BOOLEAN),
        Schema(type=OpenAPIType.NULL),
        Schema(type=OpenAPIType.ARRAY, items=Reference("#/components/schemas/JsonValue")),
        Reference("#/components/schemas/JsonObject"),
    ]
)
JSON_OBJECT = Schema(
    type=OpenAPIType.OBJECT,
    property_names=Schema(type=OpenAPIType.STRING, pattern=NO_NUL),
    additional_properties=Reference("#/components/schemas/JsonValue"),
    description=f"a JSON object: no NUL in any key or string; params and result at most {MAX_JSON_BYTES} bytes "
    f"of JSON and {MAX_JSON_DEPTH} levels deep",
)


class JsonValue:
    """Names the JSON_VALUE component."""


class JsonObject:
    """Names the JSON_OBJECT component."""


class JsonObjects(OpenAPISchemaPlugin):
    """Every `dict[str, Any]` the API takes or shows is a jsonb object: show it as JsonObject."""

    def is_plugin_supported_field(self, field_definition: FieldDefinition) -> bool:
        return field_definition.annotation == dict[str, Any]

    def to_openapi_schema(self, field_definition: FieldDefinition, schema_creator: Any) -> Any:
        # Litestar 2 drops OpenAPIConfig's component schemas, so register ours where it keeps its own.
        registry = schema_creator.schema_registry
        for name, schema in ((JsonValue, JSON_VALUE), (JsonObject, JSON_OBJECT)):
            registered = registry.get_schema_for_field_definition(FieldDefinition.from_annotation(name))
            for spec in dataclasses.fields(schema):
                setattr(registered, spec.name, getattr(schema, spec.name))
        return registry.get_reference_for_field_definition(FieldDefinition.from_annotation(JsonObject))


CONFIG = OpenAPIConfig(
    title="tasktrail",
    version="1",
    description="Event-sourced task-status service. Every error is application/problem+json (RFC 9457).",
    components=Components(
        security_schemes={
            "apiKey": SecurityScheme(
                type="http",
                scheme="bearer",
                description="`Authorization: Bearer <key>` when API keys are configured (scopes read, write, admin)",
            )
        },
    ),
)
