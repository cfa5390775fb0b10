"""What the OpenAPI schema says that Litestar cannot infer (the JSON objects tasks carry, the API key),
and the interactive docs page, served from vendored assets."""

from __future__ import annotations

import dataclasses
from html import escape
from typing import Any

from litestar import Request, get
from litestar._openapi.plugin import handle_schema_path_not_found
from litestar.datastructures import ResponseHeader
from litestar.exceptions import NotFoundException
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import JsonRenderPlugin, SwaggerRenderPlugin
from litestar.openapi.spec import Components, OpenAPIType, Reference, Schema, SecurityScheme
from litestar.params import FromPath
from litestar.plugins import OpenAPISchemaPlugin
from litestar.router import Router
from litestar.routes import HTTPRoute
from litestar.typing import FieldDefinition

from tasktrail.dashboard import routes
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


# The docs page loads only what the dashboard vendors (src/tasktrail/dashboard/static/vendor:
# pinned npm releases with their licences), so it works offline and tells no third party of a
# visit. Litestar's defaults load Redoc "latest", Swagger UI, fonts and an icon from CDNs and
# start them with an inline script; this page starts Swagger UI from a script of ours instead,
# so its Content-Security-Policy can allow scripts from this origin only. Redoc is left out:
# both its 2.x and 3.x bundles always load their logo (and 3.x icons) from Redocly's CDN.
STATIC = "/ui/static"
SWAGGER = f"{STATIC}/vendor/swagger-ui-dist-5.35.0"
DOCS_JS = f"{STATIC}/api-docs.js"
FAVICON = f"<link rel='icon' href='{STATIC}/favicon.svg' type='image/svg+xml'>"
# Swagger UI styles its elements inline.
DOCS_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:;"
    " font-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
# As the dashboard's pages: no other site may frame "Try it out" and click it.
DOCS_HEADERS = [
    ResponseHeader(name="Content-Security-Policy", value=DOCS_POLICY),
    *(ResponseHeader(name=name.decode(), value=value.decode()) for name, value in routes.PAGE_HEADERS),
]


class Swagger(SwaggerRenderPlugin):
    """Swagger UI from the vendored bundle: read the API and try it out from the browser."""

    def __init__(self) -> None:
        super().__init__(
            path="/swagger",
            js_url=f"{SWAGGER}/swagger-ui-bundle.js",
            css_url=f"{SWAGGER}/swagger-ui.css",
            standalone_preset_js_url=f"{SWAGGER}/swagger-ui-standalone-preset.js",
            favicon=FAVICON,
        )

    def render(self, request: Request, openapi_schema: dict[str, Any]) -> bytes:
        # Signed in to the dashboard, "try it out" sends the session's CSRF token with each write.
        csrf = request.scope["state"].get("csrf")
        return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
{"" if csrf is None else f'<meta name="csrf-token" content="{escape(csrf)}">'}
<title>{escape(openapi_schema["info"]["title"])} · API docs</title>
{self.favicon}
<link rel="stylesheet" href="{self.css_url}">
<script src="{self.js_url}" defer></script>
<script src="{self.standalone_preset_js_url}" defer></script>
<script src="{DOCS_JS}" defer></script>
</head>
<body>
<div id="api-docs" data-spec-url="{escape(self.get_openapi_json_route(request))}"></div>
</body>
</html>""".encode()

    def receive_router(self, router: Router) -> None:
        """No OAuth2 redirect page: the API takes bearer keys, and Litestar's page loads from a CDN.

        And a schema path that names nothing is a 404 like any other (problem+json), not
        Litestar's HTML page for it. Every page of the docs, and the schema, has the dashboard's headers.
        """
        router.response_headers = DOCS_HEADERS
        router.routes = [
            route
            for route in router.routes
            if not (
                isinstance(route, HTTPRoute)
                and any(handler.fn is handle_schema_path_not_found for handler in route.route_handlers)
            )
        ]
        router.register(_not_found)


@get("/{path:str}", sync_to_thread=False, include_in_schema=False)
def _not_found(path: FromPath[str]) -> None:
    raise NotFoundException("no such page of the API docs")


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
    # Swagger UI at /schema and /schema/swagger; the schema at /schema/openapi.json.
    render_plugins=[Swagger(), JsonRenderPlugin()],
)
